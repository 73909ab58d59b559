"""This machine's limits, measured in the same run as KubeCI's figures.

(a) `plain`, (b) `verify`, (c) `insert`: aiohttp handlers in a child process (see
`bench.limit_server`) under the load generator. (d) `claim`: concurrent connections each
claiming one queued row with `FOR UPDATE SKIP LOCKED` and completing it, one row per
transaction.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.limit_server import SECRET
from bench.load import LoadShape, send_load
from bench.payloads import PushDeliveries
from bench.procs import CpuClock, child, free_port, wait_http
from bench.stats import percentile, rate_per_s

ACCEPTED = frozenset({202})

QUEUE_DDL = """
CREATE TABLE bench_queue (
    id          bigserial PRIMARY KEY,
    state       text NOT NULL DEFAULT 'queued',
    due_at      timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX bench_queue_due ON bench_queue (due_at, id) WHERE state = 'queued';
"""

CLAIM_ONE_SQL = """
WITH due AS (
    SELECT id FROM bench_queue
    WHERE state = 'queued' AND due_at <= now()
    ORDER BY due_at, id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE bench_queue q SET state = 'done', finished_at = now()
FROM due WHERE q.id = due.id
RETURNING q.id
"""


@dataclass(frozen=True)
class ClaimShape:
    connections: int = 32
    rows: int = 60_000
    duration_s: float = 5.0


async def http_limit(
    mode: str, dsn: str, shape: LoadShape, log_dir: Path, run: int = 1
) -> dict[str, Any]:
    """Requests/s and latency of limit server `mode` under the load generator."""
    port = free_port()
    args = ["-m", "bench.limit_server", mode, str(port)]
    if mode == "insert":
        args.append(dsn)
    deliveries = PushDeliveries(SECRET)
    async with child(args, log_dir / f"limit-{mode}-{run}.log") as server:
        await wait_http(server, f"http://127.0.0.1:{port}/healthz")
        clock = CpuClock({"server": server.pid})
        result = await send_load(
            f"http://127.0.0.1:{port}/webhooks/github", deliveries.delivery, shape, clock.start
        )
        cores = clock.cores_used()
        server.check_alive()
    return {**result.figures(ACCEPTED), **cores}


async def claim_limit(dsn: str, shape: ClaimShape) -> dict[str, Any]:
    """Rows/s and per-transaction latency of the one-row SKIP LOCKED claim loop."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(QUEUE_DDL)
        await conn.execute(
            "INSERT INTO bench_queue (due_at) SELECT now() FROM generate_series(1, $1)",
            shape.rows,
        )
        await conn.execute("ANALYZE bench_queue")
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=shape.connections, max_size=shape.connections)
    assert pool is not None
    try:
        return await _claim_loops(pool, shape)
    finally:
        await pool.close()


async def _claim_loops(pool: asyncpg.Pool, shape: ClaimShape) -> dict[str, Any]:
    latencies_ms: list[float] = []
    deadline = time.perf_counter() + shape.duration_s

    async def loop() -> None:
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with conn.transaction():
                    claimed = await conn.fetchval(CLAIM_ONE_SQL)
                if claimed is None:
                    return  # the queue is empty
                latencies_ms.append((time.perf_counter() - began) * 1000)

    clock = CpuClock({"client": os.getpid()})
    clock.start()
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(shape.connections)))
    elapsed_s = time.perf_counter() - started
    return {
        "rows_per_s": rate_per_s(len(latencies_ms), elapsed_s),
        "p50_ms": percentile(latencies_ms, 0.50),
        "p99_ms": percentile(latencies_ms, 0.99),
        "claimed": len(latencies_ms),
        "queue_emptied": len(latencies_ms) >= shape.rows,
        **clock.cores_used(),
    }
