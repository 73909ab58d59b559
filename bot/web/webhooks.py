"""`POST /webhooks/github` and `POST /webhooks/gitlab`: the forges' webhook endpoints.

The handlers only read the body, within `settings.max_body_bytes`, and hand the raw
bytes and headers to `bot.intake.service.Intake`, which verifies, stores and responds.
Other methods get aiohttp's 405.
"""

from __future__ import annotations

import logging

from aiohttp import web

from bot.intake.service import Intake, IntakeResult

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024


def add_routes(app: web.Application, intake: Intake) -> None:
    async def receive_github(request: web.Request) -> web.Response:
        return await receive(request, intake, "github")

    async def receive_gitlab(request: web.Request) -> web.Response:
        return await receive(request, intake, "gitlab")

    app.router.add_post("/webhooks/github", receive_github)
    app.router.add_post("/webhooks/gitlab", receive_gitlab)


async def read_limited(request: web.Request, limit_bytes: int) -> bytes | None:
    """Return the request body, or None when it is larger than `limit_bytes`.

    A declared Content-Length over the limit is rejected before reading; a chunked
    body is read until it passes the limit.
    """
    if request.content_length is not None and request.content_length > limit_bytes:
        return None
    chunks: list[bytes] = []
    size_bytes = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
        size_bytes += len(chunk)
        if size_bytes > limit_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def receive(request: web.Request, intake: Intake, forge: str) -> web.Response:
    limit_bytes = intake.settings.max_body_bytes
    body = await read_limited(request, limit_bytes)
    result: IntakeResult
    if body is None:
        result = intake.too_large(forge, request.headers, limit_bytes)
    else:
        result = await intake.handle(forge, body, request.headers)
    return web.json_response(result.body, status=result.status)
