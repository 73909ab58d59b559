"""Fakes of outside services: real aiohttp servers on 127.0.0.1 that record requests.

`FakeServer` is the shared base. It records every request in order, and lets a test
queue scripted responses per route (an error status, headers, a delay) that are served
before the route's normal behaviour resumes.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    route: str | None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class Scripted:
    """A response queued for the next request to a route.

    With `status` None, the request waits `delay_s` and is then served normally.
    `body` is sent as JSON unless it is bytes or str.
    """

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class Rejection(Exception):
    """Raised by a handler to respond with an error."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class FakeServer:
    """Base of the fakes: lifecycle, request log and scripted responses."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.url = ""
        self._scripts: dict[str, deque[Scripted]] = {}
        self._runner: web.AppRunner | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def scripted_response(self, scripted: Scripted) -> web.Response:
        """Turn a scripted response into an aiohttp response."""
        if isinstance(scripted.body, bytes | str):
            response = web.Response(status=scripted.status or 200, body=scripted.body)
        else:
            response = web.json_response(scripted.body, status=scripted.status or 200)
        response.headers.update(scripted.headers)
        return response

    def finish_response(self, response: web.StreamResponse) -> None:
        """Add the headers every response of this service carries."""

    async def start(self) -> str:
        """Start listening on 127.0.0.1 at a free port and return the base URL."""
        app = web.Application(middlewares=[self._middleware])
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def script(self, route: str, *responses: Scripted) -> None:
        """Queue responses for the next requests to the route named `route`."""
        self._scripts.setdefault(route, deque()).extend(responses)

    def requests_to(self, route: str) -> list[Recorded]:
        return [request for request in self.requests if request.route == route]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=await request.read(),
                route=route,
            )
        )
        queue = self._scripts.get(route or "")
        scripted = queue.popleft() if queue else None
        if scripted is not None and scripted.delay_s:
            await asyncio.sleep(scripted.delay_s)
        if scripted is not None and scripted.status is not None:
            response: web.StreamResponse = self.scripted_response(scripted)
        else:
            try:
                response = await handler(request)
            except Rejection as rejection:
                response = rejection.response
        self.finish_response(response)
        return response


async def read_json(request: web.Request) -> Any:
    """Read a JSON or form body, as the real services accept both."""
    if request.content_type == "application/json":
        raw = await request.read()
        return json.loads(raw) if raw else {}
    form = await request.post()
    return {key: value for key, value in form.items() if isinstance(value, str)}
