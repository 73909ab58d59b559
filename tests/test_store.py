from __future__ import annotations

import asyncpg

from bot.store.db import migrate


async def test_migrate_is_idempotent(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        applied = await migrate(conn)
        versions = await conn.fetchval("SELECT count(*) FROM schema_migrations")
    assert applied == []
    assert versions >= 1


async def test_jsonb_round_trip(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        run_id = await conn.fetchval(
            "INSERT INTO runs (pipeline, labels) VALUES ($1, $2) RETURNING id",
            {"jobs": []},
            {"branch": "main ✓"},
        )
        labels = await conn.fetchval("SELECT labels FROM runs WHERE id = $1", run_id)
    assert labels == {"branch": "main ✓"}
