"""`/healthz` (the process responds) and `/readyz` (the database responds)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiohttp import web

from bot.store.db import DB_ERRORS

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
READY_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, TimeoutError)


def add_routes(app: web.Application, pool: asyncpg.Pool) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S), pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except READY_ERRORS as exc:
            log.warning("readiness check failed: %s", exc)
            return web.json_response({"status": "database unreachable"}, status=503)
        return web.json_response({"status": "ready"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
