"""Connection pool and schema migrations."""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

# Errors that mean "the database did not answer this time": a loop that meets one logs
# it and tries again later. InternalClientError and InterfaceError are what asyncpg
# raises on a connection whose server process was terminated mid-query.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

# A connection as code receives it: opened directly, or acquired from a pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Channel on which new work is announced; the payload names the table ("attempts", "outbox").
WAKE_CHANNEL = "kubeci_wake"

# Any constant works, as long as every KubeCI process uses the same one.
_MIGRATION_LOCK_ID = 0x6B756265


async def _init_connection(conn: Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool whose connections encode and decode json/jsonb as Python objects."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=60
    )
    assert pool is not None
    return pool


def _migration_files() -> list[tuple[int, str, str]]:
    folder = resources.files("bot.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: Connection) -> list[str]:
    """Apply the migrations this database lacks, in order; return the names applied.

    An advisory lock serialises concurrent starts of several processes.
    """
    applied_names = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migration_files():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied_names.append(name)
            log.info("applied migration %s", name)
    return applied_names


async def notify(conn: Connection, topic: str) -> None:
    """Wake idle workers; delivered when the surrounding transaction commits."""
    await conn.execute("SELECT pg_notify($1, $2)", WAKE_CHANNEL, topic)


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
