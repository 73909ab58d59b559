"""Scheduler throughput: one run of many sync webhook tasks, end to end.

The run is created through `Engine.create_run` in the bench process; `kubeci serve` in
its own process claims and runs the tasks; the target returning 204 runs in the bench
process. The rate is taken from the database's timestamps: the run's `created_at` (the
start of its creating transaction) to the last task's `finished_at`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.kubeci import Served, kubeci_serve
from bench.pipelines import webhook_pipeline
from bench.procs import ChildFailed, CpuClock, py_spy
from bench.stats import rate_per_s
from bench.target import Target
from bot.config import Settings
from bot.engine.core import Engine, RunRequest
from bot.store.db import create_pool
from pipelines_schema.models import Pipeline

LAYOUT = (
    "`kubeci serve` (worker, outbox sender, HTTP app) alone in a child process; the run "
    "is created and the 204 target served by the bench process"
)


@dataclass(frozen=True)
class SchedulerShape:
    jobs: int = 100
    steps: int = 1
    tasks: int = 100
    timeout_s: float = 240.0

    @property
    def total(self) -> int:
        return self.jobs * self.steps * self.tasks


async def create_run(
    pool: asyncpg.Pool, served: Served, pipeline: Pipeline, labels: dict[str, Any]
) -> int:
    settings = Settings(host="127.0.0.1", port=served.port)
    async with pool.acquire() as conn, conn.transaction():
        return await Engine(settings).create_run(
            conn, RunRequest(pipeline=pipeline, labels=labels, repository="bench-org/bench-repo")
        )


async def wait_run(pool: asyncpg.Pool, run_id: int, served: Served, timeout_s: float) -> str:
    """Wait until the run has ended; return its state (ChildFailed if serve died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        served.process.check_alive()
        state = await pool.fetchval("SELECT state FROM runs WHERE id = $1", run_id)
        if state != "running":
            return str(state)
        await asyncio.sleep(0.25)
    raise ChildFailed(f"run {run_id} still running after {timeout_s:g} s")


async def finish_figures(pool: asyncpg.Pool, run_id: int) -> dict[str, Any]:
    """End-to-end rate, and the drain rate of the last completions against the first."""
    created_at = await pool.fetchval("SELECT created_at FROM runs WHERE id = $1", run_id)
    rows = await pool.fetch(
        "SELECT finished_at, state FROM tasks WHERE run_id = $1 ORDER BY finished_at", run_id
    )
    done = [row["finished_at"] for row in rows]
    window = min(1000, max(2, len(done) // 4))
    elapsed_s = (done[-1] - created_at).total_seconds()
    first_s = (done[window - 1] - done[0]).total_seconds()
    last_s = (done[-1] - done[-window]).total_seconds()
    first_rate = rate_per_s(window - 1, first_s)
    last_rate = rate_per_s(window - 1, last_s)
    return {
        "tasks_per_s": rate_per_s(len(done), elapsed_s),
        "elapsed_s": elapsed_s,
        "first_to_last_task_s": (done[-1] - done[0]).total_seconds(),
        "drain_window": window,
        "first_window_per_s": first_rate,
        "last_window_per_s": last_rate,
        "last_to_first_ratio": last_rate / first_rate,
        "tasks": len(done),
        "succeeded": sum(1 for row in rows if row["state"] == "succeeded"),
    }


async def scheduler(
    dsn: str, shape: SchedulerShape, log_dir: Path, run: int = 1, profile: bool = False
) -> dict[str, Any]:
    """Run the workload once; with `profile`, record a py-spy flame graph of the worker."""
    pipeline = webhook_pipeline(shape.jobs, shape.steps, shape.tasks)
    target = await Target().start()
    pool = await create_pool(dsn, min_size=1, max_size=4)
    try:
        async with kubeci_serve(dsn, log_dir / f"scheduler-serve-{run}.log") as served:
            clock = CpuClock({"worker": served.process.pid, "bench": os.getpid()})
            svg_path = log_dir.parent / f"scheduler-profile-{run}.txt" if profile else None
            async with py_spy(served.process.pid, svg_path):
                clock.start()
                began = time.perf_counter()
                run_id = await create_run(pool, served, pipeline, {"target": target.base_url})
                create_s = time.perf_counter() - began
                state = await wait_run(pool, run_id, served, shape.timeout_s)
                cores = clock.cores_used()
        figures = await finish_figures(pool, run_id)
    finally:
        await pool.close()
        await target.close()
    return {**figures, "create_run_s": create_s, "run_state": state, **cores}
