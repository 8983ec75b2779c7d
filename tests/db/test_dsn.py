"""`planner.db.dsn`: passwords never leave a DSN or a message that quotes one."""

from __future__ import annotations

import pytest

from planner.db.dsn import dsn_secrets, redact_dsn, redact_text


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        pytest.param("postgresql://u:secretpw@db.example/app", "postgresql://u:***@db.example/app", id="url"),
        pytest.param("postgres://u:secretpw@h1:5432,h2:5433/app?sslmode=require",
                     "postgres://u:***@h1:5432,h2:5433/app?sslmode=require", id="url-several-hosts"),
        pytest.param("postgresql://:secretpw@h/app", "postgresql://:***@h/app", id="url-no-user"),
        pytest.param("postgresql://u:sec%40ret@h/app", "postgresql://u:***@h/app", id="url-percent-encoded"),
        pytest.param("postgresql://u:p@ss@h/app", "postgresql://u:***@h/app", id="url-unencoded-at"),
        pytest.param("postgresql://u:sec/ret?x@h/app", "postgresql://u:***@h/app", id="url-unencoded-slash-and-question-mark"),
        pytest.param("postgresql://u@h/app?password=secretpw&sslmode=require",
                     "postgresql://u@h/app?password=***&sslmode=require", id="query"),
        pytest.param("postgresql://u@h/app?sslmode=require&sslpassword=keypw",
                     "postgresql://u@h/app?sslmode=require&sslpassword=***", id="query-sslpassword"),
        pytest.param("host=h user=u password=secretpw dbname=app", "host=h user=u password=*** dbname=app", id="keyword"),
        pytest.param("host=h password = 'se cret \\' pw' dbname=app", "host=h password = '***' dbname=app", id="keyword-quoted"),
        pytest.param("host=h PASSWORD=secretpw", "host=h PASSWORD=***", id="keyword-upper-case"),
    ],
)
def test_redact_dsn_hides_the_password_and_keeps_the_rest(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


@pytest.mark.parametrize(
    "dsn",
    [
        pytest.param("postgresql://u@h:5432/app", id="user-only"),
        pytest.param("postgresql://[::1]:5432/app?sslmode=disable", id="ipv6-host"),
        pytest.param("host=h port=5432 user=u dbname=app", id="keyword"),
        pytest.param("postgresql://h/app?passfile=/home/u/.pgpass", id="passfile"),
        pytest.param("postgresql://postgres:@/postgres?host=/tmp/sock", id="empty-password"),
    ],
)
def test_redact_dsn_leaves_a_dsn_without_a_password_alone(dsn: str) -> None:
    assert redact_dsn(dsn) == dsn


def test_redact_dsn_finds_a_dsn_inside_a_message() -> None:
    message = "cannot connect to postgresql://u:secretpw@h/app: refused (ask admin@example.com)"
    assert redact_dsn(message) == "cannot connect to postgresql://u:***@h/app: refused (ask admin@example.com)"


def test_redact_dsn_hides_a_password_in_a_python_repr() -> None:
    assert redact_dsn("ConnectionParameters(user='u', password='secretpw')") == "ConnectionParameters(user='u', password='***')"


def test_dsn_secrets_are_the_password_decoded_and_its_pieces() -> None:
    assert dsn_secrets("postgresql://u:sec%2Fret/piece@h/app") >= {"sec%2Fret/piece", "sec/ret/piece", "piece"}


def test_dsn_secrets_leave_out_pieces_too_short_to_replace() -> None:
    assert dsn_secrets("postgresql://u:ab/cdefgh@h/app") == {"ab/cdefgh", "cdefgh"}


def test_redact_text_replaces_a_known_password_quoted_alone() -> None:
    # asyncpg reads `u:secret/pw@h` as host `u`, port `secret`, and says so
    message = "invalid literal for int() with base 10: 'secret'"
    assert redact_text(message, dsn_secrets("postgresql://u:secret/pw@h/app")) == "invalid literal for int() with base 10: '***'"


def test_redact_text_replaces_the_whole_password_before_its_pieces() -> None:
    assert redact_text("pw is long/pieces", {"long/pieces", "pieces"}) == "pw is ***"
