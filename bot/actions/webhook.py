"""The `webhook` task action: one outbound HTTP request per attempt.

`mode: sync` judges the attempt by the response status. `mode: async` sends the
attempt's callback URL (header `X-KubeCI-Callback-URL`, and `${callback_url}` in the
body if the author put it there), then parks: the engine completes the attempt when
the target POSTs to that URL, or when the attempt times out.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDict

from bot.actions.base import AttemptContext, AttemptResult
from bot.config import Settings
from bot.net.guard import OutboundAddressRefused
from bot.net.http import excerpt, make_session, rate_limit_wait_s, read_bounded, user_agent
from bot.net.secrets import MASK, encoded_forms
from bot.store.text import clean_text

log = logging.getLogger(__name__)

EXCERPT_MAX_BYTES = 4096
# Read more than the excerpt keeps, so a secret that crosses the excerpt's end is
# still whole when it is masked.
# NOTE: a secret longer than this margin could be cut before masking and leak in part.
READ_MAX_BYTES = EXCERPT_MAX_BYTES + 60 * 1024
CALLBACK_HEADER = "X-KubeCI-Callback-URL"
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

SessionFactory = Callable[[], aiohttp.ClientSession]


class WebhookArgumentError(ValueError):
    """A webhook task argument has a value the action cannot use."""


@dataclass(frozen=True)
class WebhookRequest:
    url: str
    method: str
    mode: Literal["sync", "async"]
    headers: dict[str, str]
    body: Any
    connect_timeout_s: float
    request_timeout_s: float
    # None means any 2xx status.
    success_status: frozenset[int] | None

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> WebhookRequest:
        """Check and convert the task's arguments; raise `WebhookArgumentError` if invalid."""
        unknown = set(arguments) - set(cls.__dataclass_fields__)
        if unknown:
            raise WebhookArgumentError(f"unknown webhook arguments: {', '.join(sorted(unknown))}")
        return cls(
            url=_url(arguments.get("url")),
            method=_method(arguments.get("method", "POST")),
            mode=_mode(arguments.get("mode", "sync")),
            headers=_headers(arguments.get("headers") or {}),
            body=arguments.get("body"),
            connect_timeout_s=_positive(arguments, "connect_timeout_s", 10.0),
            request_timeout_s=_positive(arguments, "request_timeout_s", 30.0),
            success_status=_statuses(arguments.get("success_status")),
        )

    def is_success(self, status: int) -> bool:
        if self.success_status is None:
            return 200 <= status <= 299
        return status in self.success_status


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise WebhookArgumentError(
            f"webhook url {value!r} is invalid; give an http:// or https:// URL"
        )
    return value


def _method(value: Any) -> str:
    method = str(value).upper()
    if method not in _METHODS:
        raise WebhookArgumentError(
            f"webhook method {value!r} is invalid; use one of {', '.join(_METHODS)}"
        )
    return method


def _mode(value: Any) -> Literal["sync", "async"]:
    if value == "sync":
        return "sync"
    if value == "async":
        return "async"
    raise WebhookArgumentError(f"webhook mode {value!r} is invalid; use sync or async")


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise WebhookArgumentError("webhook headers must be a mapping of names to strings")
    headers = {}
    for name, raw in value.items():
        if isinstance(raw, dict | list) or raw is None:
            raise WebhookArgumentError(f"webhook header {name!r} must be a string")
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if "\r" in text or "\n" in text or "\r" in str(name) or "\n" in str(name):
            raise WebhookArgumentError(f"webhook header {name!r} contains a line break")
        headers[str(name)] = text
    return headers


def _positive(arguments: Mapping[str, Any], name: str, default: float) -> float:
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise WebhookArgumentError(f"webhook {name}={value!r} is invalid; give seconds > 0")
    return float(value)


def _statuses(value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    if not items or not all(
        isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599
        for item in items
    ):
        raise WebhookArgumentError(
            f"webhook success_status {value!r} is invalid; give a list of HTTP statuses"
        )
    return frozenset(items)


@dataclass(frozen=True)
class _Response:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    elapsed_ms: int


class WebhookAction:
    """Task action `webhook`."""

    name = "webhook"
    uses_callback = True

    def __init__(self, settings: Settings, session_factory: SessionFactory | None = None) -> None:
        self._session_factory = session_factory or (lambda: make_session(settings))
        # One session for every attempt, so requests to a target reuse its connections.
        # It is opened on first use, and again after `close`.
        self._shared: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._shared is None or self._shared.closed:
            self._shared = self._session_factory()
        return self._shared

    async def close(self) -> None:
        """Close the shared HTTP session; the next attempt opens a new one."""
        if self._shared is not None:
            await self._shared.close()
            self._shared = None

    def needs_callback(self, arguments: Mapping[str, Any]) -> bool:
        """Whether an attempt with these unrendered arguments needs a callback token.

        Async mode needs one. So does any argument that names ${callback_url}. A mode
        that is a placeholder counts as async, since its value is not known yet.
        """
        if arguments.get("mode", "sync") != "sync":
            return True
        return "callback_url" in json.dumps(arguments)

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        try:
            request = WebhookRequest.from_arguments(ctx.arguments)
        except WebhookArgumentError as exc:
            return AttemptResult.failure(_hide(ctx, str(exc)), retryable=False)
        if request.mode == "async" and not ctx.callback_url:
            return AttemptResult.failure(
                "async webhook has no callback URL to send; this is a KubeCI bug, "
                "the engine must create one for webhook tasks",
                retryable=False,
            )
        target = f"{request.method} {_hide(ctx, request.url)}"
        try:
            response = await self._send(request, ctx)
        except OutboundAddressRefused as exc:
            return await self._failed(ctx, target, str(exc), retryable=False)
        except aiohttp.InvalidURL as exc:
            return await self._failed(ctx, target, f"invalid URL: {exc}", retryable=False)
        except aiohttp.TooManyRedirects:
            return await self._failed(ctx, target, "too many redirects", retryable=False)
        except aiohttp.ConnectionTimeoutError:
            message = f"connection timed out after {request.connect_timeout_s:g} s"
            return await self._failed(ctx, target, message, retryable=True)
        except TimeoutError:
            message = f"timed out: no complete response within {request.request_timeout_s:g} s"
            return await self._failed(ctx, target, message, retryable=True)
        except aiohttp.ClientError as exc:
            message = f"request failed: {type(exc).__name__}: {exc}"
            return await self._failed(ctx, target, message, retryable=True)
        return await self._judge(request, response, ctx, target)

    async def cancel(self, ctx: AttemptContext) -> None:
        # A webhook request leaves no remote object behind, so there is nothing to clean up.
        log.debug("nothing to cancel for a webhook attempt", extra={"attempt_id": ctx.attempt_id})

    async def _send(self, request: WebhookRequest, ctx: AttemptContext) -> _Response:
        headers: CIMultiDict[str] = CIMultiDict(request.headers)
        headers["Idempotency-Key"] = ctx.idempotency_key
        headers["User-Agent"] = user_agent()
        if request.mode == "async" and ctx.callback_url:
            headers[CALLBACK_HEADER] = ctx.callback_url
        data = _encode_body(request.body, headers)
        timeout = aiohttp.ClientTimeout(
            total=request.request_timeout_s, connect=request.connect_timeout_s
        )
        started = time.monotonic()
        async with self._session().request(
            request.method, request.url, headers=headers, data=data, timeout=timeout
        ) as response:
            body = await read_bounded(response.content, READ_MAX_BYTES)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            return _Response(response.status, CIMultiDict(response.headers), body, elapsed_ms)

    async def _judge(
        self, request: WebhookRequest, response: _Response, ctx: AttemptContext, target: str
    ) -> AttemptResult:
        status = response.status
        # Postgres text cannot contain NUL, which binary bodies often have.
        body_text = clean_text(response.body.decode("utf-8", "replace"))
        body_excerpt = excerpt(_hide(ctx, body_text), EXCERPT_MAX_BYTES)
        details: dict[str, Any] = {"response_status": status, "response_excerpt": body_excerpt}
        await ctx.append_log("response", f"{target} -> HTTP {status} in {response.elapsed_ms} ms\n")
        if request.is_success(status):
            if request.mode == "async":
                return AttemptResult.park(f"HTTP {status}; waiting for the callback", **details)
            return AttemptResult.success(f"HTTP {status}", **details)
        expected = (
            "2xx"
            if request.success_status is None
            else ", ".join(str(code) for code in sorted(request.success_status))
        )
        message = f"{target} returned HTTP {status}; expected {expected}"
        if status == 429 or 500 <= status <= 599:
            wait_s = rate_limit_wait_s(response.headers)
            return AttemptResult.failure(message, retry_after_s=wait_s, **details)
        return AttemptResult.failure(message, retryable=False, **details)

    async def _failed(
        self, ctx: AttemptContext, target: str, reason: str, *, retryable: bool
    ) -> AttemptResult:
        message = _hide(ctx, f"{target}: {reason}")
        await ctx.append_log("response", message + "\n")
        log.info(
            "webhook attempt failed: %s",
            message,
            extra={"run_id": ctx.run_id, "task_id": ctx.task_id, "attempt_id": ctx.attempt_id},
        )
        return AttemptResult.failure(message, retryable=retryable)


def _hide(ctx: AttemptContext, text: str) -> str:
    """Mask secrets, the callback URL and its token in text that the action stores or logs.

    The callback URL contains a live single-use token, and a target that echoes the
    request back would otherwise put it on the run page.
    """
    text = ctx.mask(text)
    forms = {
        form
        for value in (ctx.callback_url, ctx.callback_token)
        if value
        for form in encoded_forms(value)
    }
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def _encode_body(body: Any, headers: CIMultiDict[str]) -> bytes | None:
    """Encode the body: a string as text, anything else but None as JSON."""
    if body is None:
        return None
    if isinstance(body, str):
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return body.encode("utf-8")
    headers.setdefault("Content-Type", "application/json")
    return json.dumps(body).encode("utf-8")
