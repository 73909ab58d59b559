"""HTTP helpers shared by everything KubeCI sends: sessions, retry timing, body excerpts."""

from __future__ import annotations

import email.utils
import functools
import importlib.metadata
import math
import random
import time
from collections.abc import Mapping, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from multidict import CIMultiDict

from bot.config import Settings
from bot.net.guard import GuardedResolver, OutboundPolicy, guard_middleware

TRUNCATION_MARKER = "\n[truncated]"


@functools.cache
def user_agent() -> str:
    """Return the User-Agent header value, `KubeCI/<installed version>`."""
    try:
        version = importlib.metadata.version("kubeci")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"KubeCI/{version}"


def make_session(
    settings: Settings,
    *,
    verify_tls: bool = True,
    resolver: AbstractResolver | None = None,
    timeout: aiohttp.ClientTimeout | None = None,
    trace_configs: Sequence[aiohttp.TraceConfig] = (),
) -> aiohttp.ClientSession:
    """Open a client session whose every connection passes the outbound address guard.

    `resolver` is the DNS resolver the guard wraps (aiohttp's default when None). The
    session ignores proxy environment variables, so the guard checks the real target.
    Raises `ConfigError` when the allow or deny setting contains an invalid entry.
    """
    policy = OutboundPolicy.from_settings(settings)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(resolver or DefaultResolver(), policy),
        ssl=verify_tls,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout or aiohttp.ClientTimeout(total=30, connect=10),
        headers={"User-Agent": user_agent()},
        middlewares=(guard_middleware(policy),),
        trace_configs=list(trace_configs) or None,
        trust_env=False,
    )


def parse_retry_after(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """Return the wait in seconds that a `Retry-After` header requests, or None.

    The header contains either a number of seconds or an HTTP date (RFC 9110, section
    10.2.3). A date in the past gives 0; an unreadable value gives None.
    """
    raw = CIMultiDict(headers).get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        seconds = None
    if seconds is not None:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current_s = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - current_s)


def _reset_wait_s(headers: Mapping[str, str], prefix: str, now_s: float) -> float | None:
    if headers.get(f"{prefix}Remaining", "").strip() != "0":
        return None
    try:
        reset_at_s = float(headers.get(f"{prefix}Reset", ""))
    except ValueError:
        return None
    return max(0.0, reset_at_s - now_s)


def rate_limit_wait_s(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """Return how long the server requests clients to wait, in seconds, or None.

    Reads `Retry-After`, and the reset time (Unix seconds) of an exhausted rate limit:
    GitHub's `x-ratelimit-remaining: 0` with `x-ratelimit-reset`, and GitLab's
    `RateLimit-Remaining: 0` with `RateLimit-Reset`. Returns the maximum of these waits.
    """
    current_s = time.time() if now_s is None else now_s
    headers = CIMultiDict(headers)
    waits = [
        parse_retry_after(headers, now_s=current_s),
        _reset_wait_s(headers, "X-RateLimit-", current_s),
        _reset_wait_s(headers, "RateLimit-", current_s),
    ]
    known = [wait for wait in waits if wait is not None]
    return max(known) if known else None


def backoff_delay_s(
    attempt: int, initial_s: float, factor: float, max_s: float, jitter: bool = True
) -> float:
    """Return the wait before retry number `attempt` (1 for the first retry), in seconds.

    The base delay is `initial_s * factor ** (attempt - 1)`, capped at `max_s`. With
    `jitter`, the delay is "equal jitter": half the base plus a random share of the other
    half, so retries of many clients spread out but never come sooner than half the base.
    """
    exponent = max(0, attempt - 1)
    try:
        base_s = min(max_s, initial_s * factor**exponent)
    except OverflowError:
        base_s = max_s
    base_s = max(0.0, base_s)
    if not jitter:
        return base_s
    return base_s / 2 + random.uniform(0, base_s / 2)


def excerpt(data: str | bytes, max_bytes: int) -> str:
    """Return at most `max_bytes` of `data` (UTF-8) as text, ending with a marker if cut.

    The cut never splits a character; invalid UTF-8 bytes become U+FFFD. The marker
    counts towards `max_bytes` when `max_bytes` has room for it.
    """
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    text = raw.decode("utf-8", "replace")
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    marker = TRUNCATION_MARKER if max_bytes > len(TRUNCATION_MARKER) else ""
    cut = max(0, max_bytes - len(marker))
    # Step back over UTF-8 continuation bytes (0b10xxxxxx) to a character start.
    while cut > 0 and (encoded[cut] & 0xC0) == 0x80:
        cut -= 1
    return encoded[:cut].decode("utf-8") + marker


async def read_bounded(content: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """Read at most `max_bytes` of a response body; the rest is left unread."""
    chunks: list[bytes] = []
    remaining = max_bytes
    while remaining > 0:
        chunk = await content.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
