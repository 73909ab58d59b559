"""The limit servers: `python -m bench.limit_server MODE PORT [DSN]`.

Each mode adds one cost to the one before, so the differences show what each costs:
- `plain`: read the body, return 202;
- `verify`: also check `X-Hub-Signature-256` (401 when wrong) and parse the JSON;
- `insert`: also INSERT the delivery into `deliveries` (asyncpg, synchronous_commit on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

import asyncpg
from aiohttp import web

from bench.payloads import signature_valid
from bot.store.db import create_pool

log = logging.getLogger(__name__)

SECRET = "bench-webhook-secret"
MODES = ("plain", "verify", "insert")
POOL_SIZE = 32  # what `kubeci serve` opens for the default worker concurrency
INSERT_SQL = (
    "INSERT INTO deliveries (forge, delivery_id, event, action, repository, outcome)"
    " VALUES ('github', $1, $2, NULL, $3, 'accepted')"
    " ON CONFLICT (forge, delivery_id) DO NOTHING"
)


def make_app(mode: str, pool: asyncpg.Pool | None) -> web.Application:
    secret = SECRET.encode()

    async def plain(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    async def verify(request: web.Request) -> web.Response:
        body = await request.read()
        if not signature_valid(secret, body, request.headers.get("X-Hub-Signature-256")):
            return web.json_response({"error": "invalid signature"}, status=401)
        payload = json.loads(body)
        if mode == "insert":
            assert pool is not None
            await pool.execute(
                INSERT_SQL,
                request.headers["X-GitHub-Delivery"],
                request.headers["X-GitHub-Event"],
                payload["repository"]["full_name"],
            )
        return web.Response(status=202)

    app = web.Application(client_max_size=25 * 1024 * 1024)
    app.router.add_post("/webhooks/github", plain if mode == "plain" else verify)
    app.router.add_get("/healthz", lambda _request: _ok())
    return app


async def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(mode: str, port: int, dsn: str | None) -> None:
    pool = await create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE) if dsn else None
    if pool is not None:
        commit_mode = await pool.fetchval("SHOW synchronous_commit")
        assert commit_mode == "on", f"synchronous_commit is {commit_mode}; the limit needs on"
    runner = web.AppRunner(make_app(mode, pool), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    log.info("limit server %s on 127.0.0.1:%d", mode, port)
    await stop.wait()
    await runner.cleanup()
    if pool is not None:
        await pool.close()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in MODES or (argv[0] == "insert" and len(argv) < 3):
        sys.stderr.write("usage: python -m bench.limit_server plain|verify|insert PORT [DSN]\n")
        return 2
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(argv[0], int(argv[1]), argv[2] if len(argv) > 2 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
