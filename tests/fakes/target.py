"""A fake webhook target: a real aiohttp server on 127.0.0.1 that records every request.

Each path responds from a script of `Reply` objects, one per request, repeating the last
one. A reply may wait before responding, carry headers such as `Retry-After`, and, after
responding, POST `{"status": ..., "message": ...}` to the request's
`X-KubeCI-Callback-URL`, the way an asynchronous webhook target reports back.

Also here: `StubResolver`, a DNS resolver that answers from a fixed table, and
`guard_tripwire`, a trace config that fails a test before any connection to a
link-local or metadata address could open, should the outbound guard let one through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

CALLBACK_HEADER = "X-KubeCI-Callback-URL"


@dataclass(frozen=True)
class Callback:
    """The body the target POSTs to the callback URL after its response."""

    status: str = "succeeded"
    message: str = ""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: str | bytes | dict[str, Any] | list[Any] = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    callback: Callback | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass(frozen=True)
class CallbackSent:
    url: str
    payload: dict[str, str]
    status: int | None  # None when the POST failed
    error: str = ""


class FakeTarget:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.callbacks: list[CallbackSent] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._callback_sent = asyncio.Condition()
        self.base_url = ""

    async def start(self) -> FakeTarget:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # In-flight replies (scripted delays) are cut short when a test ends.
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return self.base_url + path

    def script(self, path: str, *replies: Reply) -> None:
        """Respond to requests for `path` with these replies in order; the last one repeats."""
        self._scripts[path] = list(replies)

    def received(self, path: str | None = None) -> list[RecordedRequest]:
        return [request for request in self.requests if path is None or request.path == path]

    async def wait_for_callbacks(self, count: int, timeout_s: float = 5.0) -> list[CallbackSent]:
        async with asyncio.timeout(timeout_s), self._callback_sent:
            await self._callback_sent.wait_for(lambda: len(self.callbacks) >= count)
        return self.callbacks

    def _next_reply(self, path: str) -> Reply:
        replies = self._scripts.get(path)
        if not replies:
            return Reply()
        return replies.pop(0) if len(replies) > 1 else replies[0]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                dict(request.query),
                CIMultiDict(request.headers),
                body,
            )
        )
        reply = self._next_reply(request.path)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        callback_url = request.headers.get(CALLBACK_HEADER)
        if reply.callback is not None and callback_url:
            self._start(self._call_back(callback_url, reply.callback))
        if isinstance(reply.body, dict | list):
            return web.json_response(reply.body, status=reply.status, headers=reply.headers)
        data = reply.body.encode("utf-8") if isinstance(reply.body, str) else reply.body
        return web.Response(status=reply.status, body=data, headers=reply.headers)

    def _start(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call_back(self, url: str, callback: Callback) -> None:
        await asyncio.sleep(callback.delay_s)
        payload = {"status": callback.status, "message": callback.message}
        # Only ever call back to this machine, whatever the header contains.
        if URL(url).host not in ("127.0.0.1", "localhost"):
            await self._record_callback(CallbackSent(url, payload, None, "not a local URL"))
            return
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json=payload) as response,
            ):
                sent = CallbackSent(url, payload, response.status)
        except aiohttp.ClientError as exc:
            sent = CallbackSent(url, payload, None, str(exc))
        await self._record_callback(sent)

    async def _record_callback(self, sent: CallbackSent) -> None:
        async with self._callback_sent:
            self.callbacks.append(sent)
            self._callback_sent.notify_all()


class StubResolver(AbstractResolver):
    """Answers host names from a fixed table and records what it was asked.

    A name missing from the table fails like a DNS lookup of an unknown host.
    """

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, f"stub resolver has no entry for {host}")
        results: list[ResolveResult] = []
        for address in self.table[host]:
            version = ipaddress.ip_address(address).version
            results.append(
                {
                    "hostname": host,
                    "host": address,
                    "port": port,
                    "family": socket.AF_INET if version == 4 else socket.AF_INET6,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return results

    async def close(self) -> None:
        return None


_FORBIDDEN = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    # IPv6 forms that carry an IPv4 address (IPv4-compatible, NAT64, 6to4, Teredo): no
    # test connects to any of them, whatever the IPv4 address.
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("2002::/16"),
    ipaddress.ip_network("2001::/32"),
)


def _forbidden(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if parsed in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")):
        return False
    return any(parsed in network for network in _FORBIDDEN)


def guard_tripwire(resolver: StubResolver) -> aiohttp.TraceConfig:
    """Return a trace config that raises AssertionError before a forbidden connection.

    aiohttp sends `dns_resolvehost_end` after the (guarded) resolver returned and before
    connecting, and `connection_create_start` before it connects to a literal IP.
    """
    trace = aiohttp.TraceConfig()

    async def on_start(_s: object, ctx: SimpleNamespace, params: Any) -> None:
        ctx.url = params.url

    async def on_redirect(_s: object, ctx: SimpleNamespace, params: Any) -> None:
        location = params.response.headers.get("Location", "")
        ctx.url = params.url.join(URL(location))

    async def on_resolved(_s: object, _ctx: SimpleNamespace, params: Any) -> None:
        if any(_forbidden(address) for address in resolver.table.get(params.host, [])):
            raise AssertionError(f"the guard let {params.host} through to connect")

    async def on_connect(_s: object, ctx: SimpleNamespace, _params: Any) -> None:
        host = ctx.url.raw_host or ""
        if _forbidden(host):
            raise AssertionError(f"the guard let a connection to {host} through")

    trace.on_request_start.append(on_start)
    trace.on_request_redirect.append(on_redirect)
    trace.on_dns_resolvehost_end.append(on_resolved)
    trace.on_connection_create_start.append(on_connect)
    return trace
