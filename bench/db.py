"""A fresh, migrated database per benchmark, created and dropped on the chosen server.

The server is DATABASE_URL when it is set, else the Postgres at 127.0.0.1:5432.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bot.store.db import migrate

log = logging.getLogger(__name__)

LOCAL_SERVER_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_dsn() -> str:
    return os.environ.get("DATABASE_URL") or LOCAL_SERVER_DSN


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@contextlib.asynccontextmanager
async def fresh_database(server: str) -> AsyncIterator[str]:
    """Create and migrate `kubeci_bench_<random>`; yield its DSN; drop it afterwards."""
    name = f"kubeci_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(server, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def server_facts(server: str) -> dict[str, Any]:
    """The server's version and the settings that decide what a commit costs."""
    conn = await asyncpg.connect(server)
    try:
        return {
            "postgres_version": await conn.fetchval("SHOW server_version"),
            "synchronous_commit": await conn.fetchval("SHOW synchronous_commit"),
            "fsync": await conn.fetchval("SHOW fsync"),
        }
    finally:
        await conn.close()
