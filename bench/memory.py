"""Memory: many async-callback webhook tasks in flight in one `kubeci serve` process.

The target returns 202 and keeps each callback URL. Once every task has been parked,
the target calls every URL back. The figure is the process's peak resident set
(VmHWM in /proc/PID/status) over the whole run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.kubeci import Served, kubeci_serve
from bench.pipelines import webhook_pipeline
from bench.procs import ChildFailed, memory_kb
from bench.scheduler import create_run, wait_run
from bench.target import Target
from bot.store.db import create_pool


@dataclass(frozen=True)
class MemoryShape:
    jobs: int = 10
    tasks: int = 100
    timeout_s: float = 120.0

    @property
    def total(self) -> int:
        return self.jobs * self.tasks


async def wait_parked(
    pool: asyncpg.Pool, run_id: int, served: Served, total: int, timeout_s: float
) -> None:
    """Wait until `total` attempts of the run wait for their callback."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        served.process.check_alive()
        parked = await pool.fetchval(
            "SELECT count(*) FROM attempts a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.run_id = $1 AND a.state = 'waiting'",
            run_id,
        )
        if parked >= total:
            return
        await asyncio.sleep(0.25)
    raise ChildFailed(f"fewer than {total} attempts parked after {timeout_s:g} s")


def _mb(kb: int) -> float:
    return kb / 1024


async def memory(dsn: str, shape: MemoryShape, log_dir: Path, run: int = 1) -> dict[str, Any]:
    pipeline = webhook_pipeline(shape.jobs, 1, shape.tasks, mode="async", timeout_s=600.0)
    target = await Target().start()
    pool = await create_pool(dsn, min_size=1, max_size=4)
    try:
        async with kubeci_serve(dsn, log_dir / f"memory-serve-{run}.log") as served:
            pid = served.process.pid
            at_start = memory_kb(pid)
            began = time.perf_counter()
            run_id = await create_run(pool, served, pipeline, {"target": target.base_url})
            await wait_parked(pool, run_id, served, shape.total, shape.timeout_s)
            parked_s = time.perf_counter() - began
            parked = memory_kb(pid)
            await target.release()
            state = await wait_run(pool, run_id, served, shape.timeout_s)
            at_end = memory_kb(pid)
    finally:
        await pool.close()
        await target.close()
    return {
        "peak_rss_mb": _mb(at_end["VmHWM"]),
        "rss_at_start_mb": _mb(at_start["VmRSS"]),
        "rss_all_parked_mb": _mb(parked["VmRSS"]),
        "rss_at_end_mb": _mb(at_end["VmRSS"]),
        "tasks_in_flight": shape.total,
        "park_all_s": parked_s,
        "run_state": state,
        "callbacks": {str(status): count for status, count in target.callback_statuses.items()},
    }
