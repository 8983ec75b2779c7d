"""The pytest plugin's embedded server survives the other test runs of the machine.

Its data and socket live in a folder of the session's own (`planner.testing.pytest_plugin.runs_root()`),
never in pytest's numbered temporary folders, which any other pytest run may delete; a server
that died is reported as such, once, and the run stops; a failing teardown is a reported error,
never an INTERNALERROR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from planner.db.admin import create_database
from planner.testing.pytest_plugin import OWNER, fresh_database, runs_root, server_home, session_folder, sweep

ROOT = Path(__file__).resolve().parents[2]


def _run_project(project: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """pytest on `project` with an embedded server of its own (no DSN given), sessions in `root`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PLANNER_ALLOWED_MODULES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PLANNER_TEST_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-v",
                           "--basetemp", str(project / ".tmp")], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


def _project(tmp_path: Path, tests: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
                                        "asyncio_default_test_loop_scope = session\n")
    (project / "test_it.py").write_text(textwrap.dedent(tests))
    return project


@pytest.mark.subprocess
def test_the_embedded_server_outlives_the_deletion_of_pytests_temporary_folders(tmp_path: Path) -> None:
    # What another pytest run on the machine does to the oldest numbered folders, done here to
    # this run's own: the server must not be in them.
    project = _project(tmp_path, """
        import shutil
        import asyncpg

        async def test_a_first_run(planner_database):
            con = await asyncpg.connect(planner_database)
            await con.close()

        def test_a_neighbour_deletes_pytests_folders(tmp_path_factory):
            shutil.rmtree(tmp_path_factory.getbasetemp())

        async def test_the_server_still_answers(planner_database):
            con = await asyncpg.connect(planner_database)
            try:
                assert await con.fetchval("SELECT 1") == 1
            finally:
                await con.close()
    """)
    root = tmp_path / "root"
    run = _run_project(project, root)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
    assert list(root.glob("run-*")) == [], "the session's folder outlived it"


@pytest.mark.subprocess
def test_a_dead_server_is_reported_once_by_name_and_the_run_stops_without_an_internal_error(tmp_path: Path) -> None:
    project = _project(tmp_path, """
        from pathlib import Path
        from planner.testing import pytest_plugin
        from planner.db.embedded import stop_embedded

        async def test_a_template_is_made(planner_flow_dsn):
            pass

        def test_the_server_dies():
            for home in pytest_plugin._servers.values():
                assert stop_embedded(home)

        async def test_a_database_after_it(planner_database):
            pass

        def test_never_reached():
            pass
    """)
    (project / "pytest.ini").write_text((project / "pytest.ini").read_text() + "planner_schema = schema.sql\n")
    (project / "schema.sql").write_text("CREATE TABLE t (id int);\n")
    run = _run_project(project, tmp_path / "root")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:]
    assert "INTERNALERROR" not in out
    assert "is not running any more" in out
    assert "test_never_reached" not in run.stdout.split("short test summary")[0].split("test_a_database_after_it")[-1]
    assert "dropping the template databases failed" in out  # the template's teardown: an error, reported


def test_the_suites_server_is_not_in_pytests_numbered_folders(planner_pg: str,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    socket = parse_qs(urlsplit(planner_pg).query).get("host", [""])[0]
    if not socket:
        pytest.skip("planner_pg is a server given by DSN (DATABASE_URL or --planner-dsn), not the embedded one")
    basetemp = tmp_path_factory.getbasetemp().resolve()
    assert basetemp.parent not in Path(socket).resolve().parents
    assert basetemp not in Path(socket).resolve().parents


def _own_server(dsn: str) -> None:
    if server_home(dsn) is None:
        pytest.skip("planner_pg is a server given by DSN (DATABASE_URL or --planner-dsn), not the embedded one")


async def test_the_sessions_own_server_keeps_nothing_past_a_crash(planner_pg: str) -> None:
    # What makes a database per test cheap: a new database is no longer fsynced file by file.
    _own_server(planner_pg)
    con = await asyncpg.connect(planner_pg)
    try:
        settings = {name: await con.fetchval("SELECT current_setting($1)", name)
                    for name in ("fsync", "full_page_writes", "synchronous_commit")}
    finally:
        await con.close()
    assert settings == {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


async def test_a_database_on_the_sessions_own_server_copies_its_templates_files(planner_pg: str) -> None:
    # STRATEGY FILE_COPY is the one that asks for a checkpoint (WAL_LOG, the default, does not).
    _own_server(planner_pg)
    con = await asyncpg.connect(planner_pg)
    requested = "SELECT num_requested FROM pg_stat_checkpointer"
    try:
        await con.execute("SELECT pg_stat_clear_snapshot()")
        before = await con.fetchval(requested)
        async with fresh_database(planner_pg, template="template1"):
            await con.execute("SELECT pg_stat_clear_snapshot()")
            assert await con.fetchval(requested) > before
    finally:
        await con.close()


async def test_an_unknown_create_database_strategy_is_refused(planner_pg: str) -> None:
    with pytest.raises(ValueError, match="unknown CREATE DATABASE strategy"):
        await create_database(planner_pg, "never_made", strategy="COPY; DROP DATABASE x")  # type: ignore[arg-type]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # not Python: this test is in the default tier
    proc.wait()
    return proc.pid


def test_a_finished_runs_folder_is_swept_by_the_next(tmp_path: Path) -> None:
    folder = tmp_path / "run-old"
    folder.mkdir()
    (folder / OWNER).write_text(f"{_dead_pid()}\n")
    assert sweep(tmp_path) == [folder]
    assert not folder.exists()


def test_a_running_sessions_folder_is_kept(tmp_path: Path) -> None:
    folder = session_folder(tmp_path)
    assert (folder / OWNER).read_text().strip() == str(os.getpid())
    assert sweep(tmp_path) == []
    assert folder.exists()


def test_a_folder_being_made_is_kept_for_a_grace_period(tmp_path: Path) -> None:
    young = tmp_path / "run-young"
    young.mkdir()
    old = tmp_path / "run-ownerless"
    old.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert sweep(tmp_path) == [old]
    assert young.exists()


def test_the_root_is_the_users_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    monkeypatch.setenv("PLANNER_TEST_ROOT", str(link))
    with pytest.raises(pytest.UsageError, match="not a folder of this user's"):
        runs_root()
