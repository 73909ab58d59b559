"""Outbox sinks that deliver notifier rows: `notifier.webhook` and `notifier.slack`.

A 2xx status marks the row sent. The outbox sender retries 429, 5xx, timeouts and
connection errors. Other statuses, rejected addresses and templates that cannot be
filled are permanent failures.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from bot.config import Settings
from bot.net.guard import OutboundAddressRefused
from bot.net.http import excerpt, make_session, rate_limit_wait_s, read_bounded
from bot.net.secrets import SecretStore
from bot.net.sinks import OutboxRow, Sink, SinkOutcome, SinkState
from bot.notifiers.templates import Placeholders, TemplateError, default_slack_text
from bot.store.text import clean_text

log = logging.getLogger(__name__)

WEBHOOK_KIND = "notifier.webhook"
SLACK_KIND = "notifier.slack"
ERROR_EXCERPT_BYTES = 512
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0

# Called with verify_tls; returns a session that passes the outbound address guard.
SessionFactory = Callable[[bool], aiohttp.ClientSession]


@dataclass(frozen=True)
class _Request:
    method: str
    url: str
    headers: CIMultiDict[str]
    body: bytes | None
    verify_tls: bool


class _NotifierSink(abc.ABC):
    def __init__(self, secrets: SecretStore, session_factory: SessionFactory) -> None:
        self._secrets = secrets
        self._session_factory = session_factory

    async def send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        notifier = row.payload.get("notifier")
        if not isinstance(notifier, dict) or not isinstance(notifier.get("url"), str):
            return SinkOutcome.dead("the outbox row holds no notifier with a url")
        try:
            request = self._build(row, notifier, Placeholders(row.payload, self._secrets))
        except TemplateError as exc:
            return SinkOutcome.dead(str(exc))
        return await self._post(request)

    @abc.abstractmethod
    def _build(self, row: OutboxRow, notifier: dict[str, Any], values: Placeholders) -> _Request:
        """Fill the notifier's templates into a request; raise `TemplateError` if one fails."""

    async def _post(self, request: _Request) -> SinkOutcome:
        target = f"{request.method} {self._secrets.mask(request.url)}"
        try:
            async with (
                self._session_factory(request.verify_tls) as session,
                session.request(
                    request.method, request.url, headers=request.headers, data=request.body
                ) as response,
            ):
                status, headers = response.status, CIMultiDict(response.headers)
                body = await read_bounded(response.content, ERROR_EXCERPT_BYTES + 1)
        except OutboundAddressRefused as exc:
            return SinkOutcome.dead(str(exc))
        except (aiohttp.InvalidURL, aiohttp.TooManyRedirects, ValueError) as exc:
            return SinkOutcome.dead(self._secrets.mask(f"{target}: {type(exc).__name__}: {exc}"))
        except TimeoutError:
            return SinkOutcome.retry(f"{target}: timed out")
        except aiohttp.ClientError as exc:
            return SinkOutcome.retry(self._secrets.mask(f"{target}: {type(exc).__name__}: {exc}"))
        return self._judge(target, status, headers, body)

    def _judge(
        self, target: str, status: int, headers: CIMultiDict[str], body: bytes
    ) -> SinkOutcome:
        if 200 <= status <= 299:
            return SinkOutcome.sent(f"HTTP {status}")
        # The outbox stores this message, and Postgres text rejects NUL.
        body_text = clean_text(body.decode("utf-8", "replace"))
        text = excerpt(self._secrets.mask(body_text), ERROR_EXCERPT_BYTES)
        message = f"{target} returned HTTP {status}" + (f": {text}" if text else "")
        if status == 429 or 500 <= status <= 599:
            return SinkOutcome.retry(message, retry_after_s=rate_limit_wait_s(headers))
        return SinkOutcome.dead(message)


class WebhookNotifier(_NotifierSink):
    """Sends the notifier's body template, or the event as JSON when it has none."""

    def _build(self, row: OutboxRow, notifier: dict[str, Any], values: Placeholders) -> _Request:
        name = str(notifier.get("name", ""))
        headers: CIMultiDict[str] = CIMultiDict(values.fill(notifier.get("headers") or {}, name))
        # The sink key stays the same across retries, so targets can drop repeats.
        headers["Idempotency-Key"] = row.sink_key
        template = notifier.get("body")
        if template is None:
            body: Any = {
                "event": row.payload.get("event"),
                "run": row.payload.get("run"),
                "labels": row.payload.get("labels"),
            }
        else:
            body = values.fill(template, name)
        return _Request(
            method=str(notifier.get("method") or "POST").upper(),
            url=values.fill(notifier["url"], name),
            headers=headers,
            body=_encode(body, headers),
            verify_tls=bool(notifier.get("verify_tls", True)),
        )


class SlackNotifier(_NotifierSink):
    """Posts `{"text": ...}` to a Slack incoming-webhook URL."""

    def _build(self, row: OutboxRow, notifier: dict[str, Any], values: Placeholders) -> _Request:
        name = str(notifier.get("name", ""))
        template = notifier.get("text")
        text = default_slack_text(row.payload) if template is None else values.fill(template, name)
        headers: CIMultiDict[str] = CIMultiDict()
        return _Request(
            method="POST",
            url=values.fill(notifier["url"], name),
            headers=headers,
            body=_encode({"text": text}, headers),
            verify_tls=True,
        )


def _encode(body: Any, headers: CIMultiDict[str]) -> bytes:
    if isinstance(body, str):
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return body.encode("utf-8")
    headers.setdefault("Content-Type", "application/json")
    return json.dumps(body).encode("utf-8")


def notifier_sinks(
    settings: Settings,
    *,
    secrets: SecretStore | None = None,
    session_factory: SessionFactory | None = None,
) -> dict[str, Sink]:
    """Return the notifier sinks by outbox kind, for `OutboxSender`."""
    store = secrets or SecretStore.from_settings(settings)

    def default_factory(verify_tls: bool) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        return make_session(settings, verify_tls=verify_tls, timeout=timeout)

    factory = session_factory or default_factory
    return {
        WEBHOOK_KIND: WebhookNotifier(store, factory),
        SLACK_KIND: SlackNotifier(store, factory),
    }
