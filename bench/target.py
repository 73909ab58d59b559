"""A minimal webhook target on 127.0.0.1 for the scheduler and memory benchmarks.

`POST /sync` returns 204. `POST /async` returns 202 and keeps the request's callback URL
(`X-KubeCI-Callback-URL`); `release()` then POSTs `{"status": "succeeded"}` to every kept
URL, a bounded number at a time, the way an asynchronous target reports back.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web
from yarl import URL

log = logging.getLogger(__name__)

CALLBACK_HEADER = "X-KubeCI-Callback-URL"


class Target:
    def __init__(self) -> None:
        self.sync_count = 0
        self.callback_urls: list[str] = []
        self.callback_statuses: dict[int, int] = {}
        self.first_request_at: float | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> Target:
        app = web.Application()
        app.router.add_post("/sync", self._sync)
        app.router.add_post("/async", self._async)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _seen(self) -> None:
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()

    async def _sync(self, request: web.Request) -> web.Response:
        await request.read()
        self._seen()
        self.sync_count += 1
        return web.Response(status=204)

    async def _async(self, request: web.Request) -> web.Response:
        await request.read()
        self._seen()
        url = request.headers.get(CALLBACK_HEADER)
        if url is None:
            return web.json_response({"error": f"{CALLBACK_HEADER} is missing"}, status=400)
        self.callback_urls.append(url)
        return web.json_response({"status": "accepted"}, status=202)

    async def release(self, concurrency: int = 32, timeout_s: float = 120.0) -> None:
        """POST a success callback to every kept URL; count the responses by status."""
        urls, self.callback_urls = self.callback_urls, []
        for url in urls:
            if URL(url).host != "127.0.0.1":
                raise ValueError(f"callback URL {url!r} rejected: only 127.0.0.1 is called")
        queue: asyncio.Queue[str] = asyncio.Queue()
        for url in urls:
            queue.put_nowait(url)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._call_back(session, queue) for _ in range(concurrency)))

    async def _call_back(self, session: aiohttp.ClientSession, queue: asyncio.Queue[str]) -> None:
        while not queue.empty():
            url = queue.get_nowait()
            try:
                async with session.post(url, json={"status": "succeeded"}) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                log.warning("callback failed: %s", exc)
                status = 0
            self.callback_statuses[status] = self.callback_statuses.get(status, 0) + 1
