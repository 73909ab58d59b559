"""`POST /callbacks/{token}`: a webhook target or a pod reports its task's outcome."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import asyncpg
from aiohttp import web

from bot.engine.callbacks import CallbackBodyError, complete_by_callback, parse_callback_body
from bot.engine.core import Engine

log = logging.getLogger(__name__)

MAX_CALLBACK_BYTES = 64 * 1024


def add_routes(
    app: web.Application, engine: Engine, pool: asyncpg.Pool, mask: Callable[[str], str]
) -> None:
    async def handle(request: web.Request) -> web.Response:
        return await receive_callback(request, engine, pool, mask)

    app.router.add_post("/callbacks/{token}", handle)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def receive_callback(
    request: web.Request, engine: Engine, pool: asyncpg.Pool, mask: Callable[[str], str]
) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_CALLBACK_BYTES:
        return _error(413, f"callback body over {MAX_CALLBACK_BYTES} bytes; send a shorter message")
    raw = await request.content.read(MAX_CALLBACK_BYTES + 1)
    if len(raw) > MAX_CALLBACK_BYTES:
        return _error(413, f"callback body over {MAX_CALLBACK_BYTES} bytes; send a shorter message")
    try:
        report = parse_callback_body(json.loads(raw or b"null"))
    except (ValueError, RecursionError, CallbackBodyError) as exc:
        message = str(exc) if isinstance(exc, CallbackBodyError) else f"invalid JSON: {exc}"
        log.info("callback rejected: %s", message)
        return _error(400, message)
    attempt_id = await complete_by_callback(engine, pool, request.match_info["token"], report, mask)
    if attempt_id is None:
        # One response for unknown, used and expired tokens, so a caller learns nothing.
        return _error(404, "unknown, used or expired callback token, or the task timed out")
    return web.json_response({"status": "accepted", "attempt_id": attempt_id})
