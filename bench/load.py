"""The load generator: concurrent senders on one aiohttp client session.

Every sender loops: build request number `i`, POST it, read the response, record the
latency. A warm-up phase (connections opened, code paths warmed) is not measured. The
measured phase stops at `max_requests` or `duration_s`, whichever comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from bench.stats import percentile, rate_per_s

GENERATOR = f"aiohttp {aiohttp.__version__} client, one event loop in the bench process"
RequestMaker = Callable[[int], tuple[bytes, dict[str, str]]]


@dataclass(frozen=True)
class LoadShape:
    senders: int = 32
    duration_s: float = 5.0
    max_requests: int = 50_000
    warmup_s: float = 1.0
    timeout_s: float = 30.0


@dataclass
class LoadResult:
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0

    def accepted(self, ok: frozenset[int]) -> int:
        return sum(count for status, count in self.statuses.items() if status in ok)

    def figures(self, ok: frozenset[int]) -> dict[str, Any]:
        return {
            "requests_per_s": rate_per_s(self.accepted(ok), self.elapsed_s),
            "p50_ms": percentile(self.latencies_ms, 0.50),
            "p99_ms": percentile(self.latencies_ms, 0.99),
            "accepted": self.accepted(ok),
            "sent": sum(self.statuses.values()) + sum(self.errors.values()),
            "client_cores": self.client_cpu_s / self.elapsed_s if self.elapsed_s else 0.0,
            "statuses": {str(status): count for status, count in self.statuses.items()},
            "errors": dict(self.errors),
        }


async def _phase(
    session: aiohttp.ClientSession,
    url: str,
    make: RequestMaker,
    numbers: Iterator[int],
    shape: LoadShape,
    duration_s: float,
    limit: int,
) -> LoadResult:
    result = LoadResult()
    timeout = aiohttp.ClientTimeout(total=shape.timeout_s)
    started = time.perf_counter()
    deadline = started + duration_s
    sent = itertools.count()

    async def sender() -> None:
        while time.perf_counter() < deadline and next(sent) < limit:
            body, headers = make(next(numbers))
            began = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers, timeout=timeout) as r:
                    await r.read()
                    result.statuses[r.status] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors[type(exc).__name__] += 1
                continue
            result.latencies_ms.append((time.perf_counter() - began) * 1000)

    cpu_before = time.process_time()
    await asyncio.gather(*(sender() for _ in range(shape.senders)))
    result.elapsed_s = time.perf_counter() - started
    result.client_cpu_s = time.process_time() - cpu_before
    return result


async def send_load(
    url: str,
    make: RequestMaker,
    shape: LoadShape,
    on_measure: Callable[[], None] | None = None,
) -> LoadResult:
    """Warm up, call `on_measure` (to start CPU clocks), then measure; return the result.

    Raises ValueError for a URL that is not on the loopback address.
    """
    if URL(url).host != "127.0.0.1":
        raise ValueError(f"load URL {url!r} rejected: benchmarks send only to 127.0.0.1")
    numbers = itertools.count()
    connector = aiohttp.TCPConnector(limit=shape.senders, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        if shape.warmup_s > 0:
            await _phase(session, url, make, numbers, shape, shape.warmup_s, shape.max_requests)
        if on_measure is not None:
            on_measure()
        return await _phase(
            session, url, make, numbers, shape, shape.duration_s, shape.max_requests
        )
