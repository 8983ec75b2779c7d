"""Helpers on a connection of their own: the server's version, creating and dropping databases."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from planner.db.pooler import connect
from planner.errors import DatabaseUnavailable
from planner.results import error_text


async def server_version(dsn: str, *, default_pooler: str | None = None) -> str:
    """`PostgreSQL 17.2`: the version of the server of `dsn`, asked on a connection of its own
    (connecting gives up after 5 s). Raises `DatabaseUnavailable` (with the driver's reason)
    when it cannot be reached. `default_pooler`: the settings' `PLANNER_POOLER`, below the DSN's."""
    try:
        con = await connect(dsn, default_pooler=default_pooler, connect_timeout=5.0)
    except DatabaseUnavailable:
        raise
    except Exception as exc:  # refused, unknown host, bad DSN, authentication...
        raise DatabaseUnavailable(f"cannot reach the database: {error_text(exc)}") from exc
    try:
        return "PostgreSQL " + str(await con.fetchval("SHOW server_version"))
    finally:
        await con.close()


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted. Identifiers cannot be bound parameters; values always are."""
    return '"' + name.replace('"', '""') + '"'


Strategy = Literal["WAL_LOG", "FILE_COPY"]


async def create_database(server_dsn: str, name: str, *, template: str | None = None,
                          strategy: Strategy | None = None) -> None:
    """`CREATE DATABASE name [TEMPLATE template] [STRATEGY strategy]` on the server of `server_dsn`.
    `FILE_COPY` copies the template's files after a checkpoint: cheaper than the server's default
    (`WAL_LOG`, every block through the WAL) for a small template on a server without fsync."""
    if strategy not in (None, "WAL_LOG", "FILE_COPY"):
        raise ValueError(f"unknown CREATE DATABASE strategy: {strategy!r}")
    statement = ("CREATE DATABASE " + quote_ident(name) + (" TEMPLATE " + quote_ident(template) if template else "")
                 + (" STRATEGY " + strategy if strategy else ""))
    admin = await connect(server_dsn)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop a database if it exists, disconnecting whoever is still on it."""
    admin = await connect(server_dsn)
    try:
        await admin.execute("DROP DATABASE IF EXISTS " + quote_ident(name) + " WITH (FORCE)")
    finally:
        await admin.close()


def with_database(dsn: str, database: str) -> str:
    """The same server, another database: `postgresql://.../old?x` -> `postgresql://.../database?x`."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))
