"""A fake GitHub REST API on 127.0.0.1 for the intake benchmark.

It serves one pipeline file through the contents API, at any ref, and accepts what a
KubeCI intake and reporter send back (commit statuses, check runs, comments), responding
with GitHub's status codes and error bodies. It counts requests per route.
https://docs.github.com/en/rest/repos/contents#get-repository-content
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOT_FOUND = {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}


class FakeGitHub:
    def __init__(self, repository: str, pipeline_text: str, path: str = ".kubeci.yml") -> None:
        self.repository = repository
        self.path = path
        self.pipeline = pipeline_text.encode()
        self.requests: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> FakeGitHub:
        app = web.Application(middlewares=[self._count])
        repo = "/repos/{owner}/{repo}"
        app.router.add_get(repo + "/contents/{path:.+}", self._contents)
        app.router.add_post(repo + "/statuses/{sha}", self._created)
        app.router.add_post(repo + "/check-runs", self._created)
        app.router.add_patch(repo + "/check-runs/{id}", self._updated)
        app.router.add_post(repo + "/issues/{number}/comments", self._created)
        app.router.add_patch(repo + "/issues/comments/{id}", self._updated)
        app.router.add_get(repo + "/collaborators/{user}/permission", self._permission)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        self.requests[f"{request.method} {route.canonical if route else request.path}"] += 1
        if route is None:
            return web.json_response(NOT_FOUND, status=404)
        return await handler(request)

    def _same_repository(self, request: web.Request) -> bool:
        return f"{request.match_info['owner']}/{request.match_info['repo']}" == self.repository

    async def _contents(self, request: web.Request) -> web.Response:
        if not self._same_repository(request) or request.match_info["path"] != self.path:
            return web.json_response(NOT_FOUND, status=404)
        if "raw" in request.headers.get("Accept", ""):
            return web.Response(body=self.pipeline, content_type="application/vnd.github.raw")
        return web.json_response(
            {
                "type": "file",
                "encoding": "base64",
                "size": len(self.pipeline),
                "name": self.path.rsplit("/", 1)[-1],
                "path": self.path,
                "sha": hashlib.sha1(self.pipeline).hexdigest(),
                "content": base64.encodebytes(self.pipeline).decode(),
            }
        )

    async def _created(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        return web.json_response({"id": next(self._ids), **body}, status=201)

    async def _updated(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        return web.json_response({"id": int(request.match_info["id"]), **body})

    async def _permission(self, request: web.Request) -> web.Response:
        user = request.match_info["user"]
        return web.json_response({"permission": "write", "user": {"login": user}})
