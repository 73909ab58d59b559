"""A small HTTP service for the demo pipeline to call.

Paths:
  /ok                          answer 200 with a JSON body
  /flaky?failures=N            answer 503 the first N times per Idempotency-Key, then 200
  /slow?delay_s=S              wait S seconds, then answer 200
  /fail?status=C               answer with status C (default 500)
  /async?delay_s=S&status=X    answer 202, then after S seconds POST {"status": X} to the
                               URL in the X-KubeCI-Callback-URL header
  /notify                      accept a notifier delivery and print a line about it

Run it alone with `python examples/target.py --port 8099`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections import Counter

from aiohttp import ClientSession, ClientTimeout, web

log = logging.getLogger("demo-target")

FAILURES_SEEN: web.AppKey[Counter[str]] = web.AppKey("failures_seen")
PENDING: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("pending")


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "path": request.path_qs})


async def flaky(request: web.Request) -> web.Response:
    failures = int(request.query.get("failures", "1"))
    key = request.headers.get("Idempotency-Key", "")
    seen = request.app[FAILURES_SEEN]
    if seen[key] < failures:
        seen[key] += 1
        return web.json_response(
            {"error": f"failure {seen[key]} of {failures} (on purpose)"}, status=503
        )
    return web.json_response({"status": "ok after retries"})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay_s", "5")))
    return web.json_response({"status": "ok, slowly"})


async def fail(request: web.Request) -> web.Response:
    status = int(request.query.get("status", "500"))
    return web.json_response({"error": "failing on purpose"}, status=status)


async def call_back(url: str, delay_s: float, status: str) -> None:
    await asyncio.sleep(delay_s)
    body = {"status": status, "message": f"demo target reports {status}"}
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as session,
        session.post(url, json=body) as response,
    ):
        log.info("callback returned HTTP %d", response.status)


async def async_job(request: web.Request) -> web.Response:
    url = request.headers.get("X-KubeCI-Callback-URL")
    if not url:
        return web.json_response({"error": "missing X-KubeCI-Callback-URL"}, status=400)
    delay_s = float(request.query.get("delay_s", "1"))
    status = request.query.get("status", "succeeded")
    task = asyncio.create_task(call_back(url, delay_s, status))
    request.app[PENDING].add(task)
    task.add_done_callback(request.app[PENDING].discard)
    return web.json_response({"status": "accepted"}, status=202)


async def notify(request: web.Request) -> web.Response:
    try:
        event = (await request.json()).get("event", {})
    except (ValueError, AttributeError):
        event = {}
    print(
        f"             [notifier] {event.get('scope')} {event.get('job')} {event.get('name')}",
        flush=True,
    )
    return web.Response(status=204)


def make_app() -> web.Application:
    app = web.Application()
    app[FAILURES_SEEN] = Counter()
    app[PENDING] = set()
    app.router.add_route("*", "/ok", ok)
    app.router.add_route("*", "/flaky", flaky)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/fail", fail)
    app.router.add_post("/async", async_job)
    app.router.add_post("/notify", notify)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="demo webhook target for KubeCI")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    web.run_app(
        make_app(),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
