"""Keeping database passwords out of everything planner prints or logs. Pure string functions.

A DSN comes in three spellings, and a password can hide in each:

    postgresql://user:PASSWORD@host:5432/db          the URL's user information
    postgresql://user@host/db?password=PASSWORD       a query parameter (also `sslpassword`)
    host=h user=u password=PASSWORD dbname=d          libpq's keyword=value form (value may be 'quoted')

`redact_dsn` replaces each password by `***` and leaves the rest readable. Where it cannot tell
where a password ends, it hides more rather than less.

The pooler a DSN names (`?pgbouncer=transaction`, planner's own parameter) is read here too
(`split_pooler`, `pooler_mode`): pure string work, needing no driver.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["MASK", "TRANSACTION_POOLER", "dsn_secrets", "pooler_mode", "redact_dsn", "redact_text", "split_pooler"]

TRANSACTION_POOLER = "transaction"

MASK = "***"

# `scheme://user:` then everything up to the last `@` before whitespace: asyncpg cuts the user
# information at the first `@`, libpq at the last, and a password may hold an unencoded `/` or
# `?` that breaks both; hiding up to the last `@` covers every reading.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\[\]]*:)(?P<secret>[^\s]+)(?=@)")
# `password=value` as a query parameter, a libpq keyword, or a Python repr (`password='x'`),
# with or without spaces around `=`; a quoted value may contain escaped quotes.
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_])(?:ssl)?password\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&#,)'\"]*)",
    re.IGNORECASE,
)
# A password shorter than this is not replaced wherever it occurs: it would shred every
# message (a one-letter password matches half the words), and it protects nothing anyway.
_MIN_SECRET = 4


def redact_dsn(dsn: str) -> str:
    """`dsn` with every password replaced by `***`: `postgresql://u:pw@h/db` -> `postgresql://u:***@h/db`.

    Also works on any text that contains DSNs (an error message, a log line).
    """
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, dsn)
    return _KEYWORD_PASSWORD.sub(_mask_keyword, text)


def _mask_keyword(match: re.Match[str]) -> str:
    secret = match["secret"]
    if not secret:
        return match[0]
    quote = secret[0] if secret[0] in "'\"" else ""
    return match["head"] + quote + MASK + quote


def dsn_secrets(dsn: str) -> set[str]:
    """The passwords written in `dsn`, as written and percent-decoded, and their pieces.

    The pieces are what a DSN parser makes of a password that holds an unencoded `/`, `?`, `#`,
    `@` or `:`: `u:sec/ret@h` reaches asyncpg as port `sec`, and its error message quotes that
    piece alone. Pieces shorter than 4 characters are left out (see `redact_text`).
    """
    found: set[str] = set()
    for pattern in (_URL_PASSWORD, _KEYWORD_PASSWORD):
        for match in pattern.finditer(dsn):
            secret = match["secret"]
            if secret[:1] in ("'", '"'):
                secret = secret[1:-1] if len(secret) > 1 and secret[-1] == secret[0] else secret[1:]
            for form in (secret, unquote(secret)):
                found.add(form)
                found.update(re.split(r"[/?#@:&]", form))
    return {s for s in found if len(s) >= _MIN_SECRET}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with DSN passwords masked (see `redact_dsn`) and every known secret replaced by `***`.

    `secrets` are passwords known to be in use (from `dsn_secrets`), for messages that quote one
    without the DSN around it. Longer secrets are replaced first, so a piece never leaves a part
    of its whole behind.
    """
    text = redact_dsn(text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= _MIN_SECRET:
            text = text.replace(secret, MASK)
    return text


# --- the pooler a DSN (or a setting) names -------------------------------------------------

_POOLER_VALUES = {"transaction": TRANSACTION_POOLER, "true": TRANSACTION_POOLER, "1": TRANSACTION_POOLER,
                  "session": None, "none": None, "false": None, "0": None, "": None}


def pooler_mode(value: str | None, source: str = "pooler") -> str | None:
    """`"transaction"` (also `true`, `1`) or None (`session`, `none`, `false`, `0`, unset).
    PgBouncer's statement mode cannot work: a node's statement list is one transaction."""
    if value is None:
        return None
    key = value.strip().lower()
    if key == "statement":
        raise ValueError(f"{source} {value!r}: a statement-mode pooler cannot run planner's transactions "
                         "(a statement list, a combined write); use pool_mode = transaction")
    if key not in _POOLER_VALUES:
        raise ValueError(f"{source} {value!r}: expected 'transaction', or 'session'/'none' for no pooler "
                         "(or a session-mode one)")
    return _POOLER_VALUES[key]


def split_pooler(dsn: str) -> tuple[str, str | None]:
    """`postgresql://h/db?pgbouncer=transaction&x=1` -> (`postgresql://h/db?x=1`, `"transaction"`):
    the DSN without its `pgbouncer` query parameter, and that parameter's value (None if absent)."""
    if "?" not in dsn:
        return dsn, None
    head, _, query = dsn.partition("?")
    query, hash_, fragment = query.partition("#")
    kept: list[str] = []
    found: str | None = None
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if unquote(key).strip().lower() == "pgbouncer":
            found = unquote(value)
        else:
            kept.append(item)
    if found is None:
        return dsn, None
    rest = "&".join(i for i in kept if i)
    return head + ("?" + rest if rest else "") + hash_ + fragment, found
