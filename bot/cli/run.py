"""`kubeci run FILE`: run a pipeline file once through the engine and print its progress.

The run uses the same store, engine, worker and outbox sender as `kubeci serve`, and
serves the callback endpoint on a local port while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from bot.app import Services, build_services, close_services, create_app, serving, with_bound_port
from bot.config import Settings
from bot.engine.core import RunRequest
from bot.store.db import Connection
from pipelines_schema.loader import MAX_FILE_BYTES, PipelineError, load_pipeline
from pipelines_schema.models import Pipeline

log = logging.getLogger(__name__)

LOG_EXCERPT_LINES = 8
POLL_S = 0.2
# After a cancel (timeout or signal), how long to wait for running tasks to stop.
CANCEL_GRACE_S = 15.0


class LabelError(ValueError):
    pass


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LabelError(f"invalid label {item!r}; write it as KEY=VALUE, e.g. branch=main")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise LabelError(
                f"label {key!r} is not valid UTF-8; pass its value as UTF-8 text"
            ) from None
        labels[key.strip()] = value
    return labels


def git_labels(folder: Path) -> dict[str, str]:
    """Labels from the git checkout holding `folder`, if there is one."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    try:
        sha = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {}
    labels = {}
    if sha:
        labels["sha"] = sha
    if branch and branch != "HEAD":
        labels["branch"] = branch
        labels["ref"] = f"refs/heads/{branch}"
    return labels


def _clock() -> str:
    return time.strftime("%H:%M:%S")


class ProgressPrinter:
    """Print a run's events as they are committed, with log excerpts of finished tasks."""

    def __init__(self, pool: asyncpg.Pool, run_id: int, out: TextIO) -> None:
        self.pool = pool
        self.run_id = run_id
        self.out = out
        self.last_event_id = 0

    async def poll(self) -> None:
        async with self.pool.acquire() as conn:
            events = await conn.fetch(
                "SELECT e.*, j.name AS job, s.name AS step, t.name AS task,"
                " extract(epoch FROM coalesce(t.finished_at, s.finished_at, j.finished_at)"
                " - coalesce(t.started_at, s.started_at, j.started_at)) AS duration_s"
                " FROM events e LEFT JOIN jobs j ON j.id = e.job_id"
                " LEFT JOIN steps s ON s.id = e.step_id LEFT JOIN tasks t ON t.id = e.task_id"
                " WHERE e.run_id = $1 AND e.id > $2 ORDER BY e.id",
                self.run_id,
                self.last_event_id,
            )
            for event in events:
                self.last_event_id = event["id"]
                await self._print_event(conn, event)

    async def _print_event(self, conn: Connection, event: asyncpg.Record) -> None:
        scope, name, payload = event["scope"], event["name"], event["payload"]
        if name == "complete" and scope != "run" and payload.get("state") != "cancelled":
            return  # the failed or succeeded event already reported it
        what = {
            "job": f"job {event['job']}",
            "step": f"  step {event['step']}",
            "task": f"    task {event['task']}",
            "run": "run",
        }[scope]
        line = f"{_clock()} {what} {name.replace('_', ' ')}"
        if name in ("succeeded", "failed") and event["duration_s"] is not None:
            line += f" in {event['duration_s']:.1f} s"
        if name == "attempt_failed":
            line = f"{_clock()} {what} attempt {payload.get('attempt')} failed"
        if name == "complete":
            line = f"{_clock()} {what} {payload.get('state')}"
        if payload.get("message"):
            line += f": {payload['message']}"
        print(line, file=self.out, flush=True)
        if scope == "task" and name in ("succeeded", "failed"):
            await self._print_log_excerpt(conn, event["task_id"])

    async def _print_log_excerpt(self, conn: Connection, task_id: int) -> None:
        rows = await conn.fetch(
            "SELECT l.content FROM logs l JOIN attempts a ON a.id = l.attempt_id"
            " WHERE a.task_id = $1 ORDER BY a.number DESC, l.id DESC LIMIT 50",
            task_id,
        )
        text = "".join(row["content"] for row in reversed(rows))
        lines = [line for line in text.splitlines() if line.strip()][-LOG_EXCERPT_LINES:]
        for line in lines:
            print(f"             | {line[:200]}", file=self.out, flush=True)


async def print_summary(pool: asyncpg.Pool, run_id: int, out: TextIO) -> str:
    """Print one line per job, step and task; return the run's state."""
    async with pool.acquire() as conn:
        run = await conn.fetchrow("SELECT state, message FROM runs WHERE id = $1", run_id)
        tasks = await conn.fetch(
            "SELECT j.name AS job, j.state AS job_state, s.name AS step, s.state AS step_state,"
            " t.name AS task, t.state AS task_state, t.attempts,"
            " extract(epoch FROM t.finished_at - t.started_at) AS duration_s"
            " FROM tasks t JOIN steps s ON s.id = t.step_id JOIN jobs j ON j.id = s.job_id"
            " WHERE j.run_id = $1 ORDER BY j.position, s.position, t.position",
            run_id,
        )
    assert run is not None
    print(f"\nSummary of run {run_id}: {run['state']}", file=out)
    seen: set[tuple[str, ...]] = set()
    for row in tasks:
        if (row["job"],) not in seen:
            seen.add((row["job"],))
            print(f"  job {row['job']}: {row['job_state']}", file=out)
        if (row["job"], row["step"]) not in seen:
            seen.add((row["job"], row["step"]))
            print(f"    step {row['step']}: {row['step_state']}", file=out)
        duration = f", {row['duration_s']:.1f} s" if row["duration_s"] is not None else ""
        attempts = f", {row['attempts']} attempt(s)" if row["attempts"] else ""
        print(f"      task {row['task']}: {row['task_state']}{attempts}{duration}", file=out)
    out.flush()
    return str(run["state"])


async def _settled(pool: asyncpg.Pool, run_id: int) -> bool:
    """True once the run ended, no attempt of it runs, and its notifiers were sent."""
    async with pool.acquire() as conn:
        return bool(
            await conn.fetchval(
                "SELECT (SELECT state FROM runs WHERE id = $1) <> 'running'"
                " AND NOT EXISTS (SELECT 1 FROM attempts a JOIN tasks t ON t.id = a.task_id"
                "   WHERE t.run_id = $1 AND a.state IN ('queued', 'running', 'waiting'))"
                " AND NOT EXISTS (SELECT 1 FROM outbox WHERE run_id = $1 AND state = 'pending')",
                run_id,
            )
        )


def prepare_run(
    path: str, label_items: list[str], jobs: list[str]
) -> tuple[Pipeline, dict[str, Any]]:
    """Load the pipeline file and build the run's labels (raises RunSetupError)."""
    try:
        size_bytes = Path(path).stat().st_size
        if size_bytes > MAX_FILE_BYTES:
            raise RunSetupError(
                f"kubeci run: {path} is {size_bytes} bytes; pipeline files may have at most "
                f"{MAX_FILE_BYTES} bytes",
                2,
            )
        pipeline = load_pipeline(Path(path).read_bytes(), filename=path)
        labels: dict[str, Any] = {
            "forge": "manual",
            "event": "manual",
            "trigger": "manual",
            **git_labels(Path(path).resolve().parent),
            **parse_labels(label_items),
        }
    except PipelineError as exc:
        raise RunSetupError("\n".join(problem.format() for problem in exc.problems), 1) from None
    except (OSError, LabelError) as exc:
        raise RunSetupError(f"kubeci run: {exc}", 2) from None
    unknown = [name for name in jobs if name not in {job.name for job in pipeline.jobs}]
    if unknown:
        raise RunSetupError(f"kubeci run: no job named {', '.join(unknown)} in {path}", 2)
    return pipeline, labels


class RunSetupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_command(
    settings: Settings, path: str, label_items: list[str], jobs: list[str], timeout_s: float
) -> int:
    """`kubeci run`: return 0 when the run succeeds, 1 when it fails, 2 on bad usage."""
    try:
        pipeline, labels = prepare_run(path, label_items, jobs)
    except RunSetupError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    # Without a fixed port, a free one is picked so two runs never collide.
    if not settings.public_url and "KUBECI_PORT" not in os.environ:
        settings = dataclasses.replace(settings, port=0)
    return asyncio.run(run_pipeline(settings, pipeline, labels, jobs, timeout_s))


async def run_pipeline(
    settings: Settings,
    pipeline: Pipeline,
    labels: dict[str, Any],
    jobs: list[str],
    timeout_s: float,
    out: TextIO = sys.stdout,
) -> int:
    services = await build_services(settings)
    try:
        return await _run_with_services(services, pipeline, labels, jobs, timeout_s, out)
    finally:
        await close_services(services)


async def _run_with_services(
    services: Services,
    pipeline: Pipeline,
    labels: dict[str, Any],
    jobs: list[str],
    timeout_s: float,
    out: TextIO,
) -> int:
    settings = services.settings
    async with serving(create_app(services), settings.host, settings.port) as port:
        services.engine.settings = with_bound_port(settings, port)
        # This process alone runs and reports its run, with its own settings and secrets;
        # a `kubeci serve` sharing the database leaves it alone, and the reverse.
        services.worker.pinned_to = services.worker.worker_id
        services.sender.pinned_to = services.worker.worker_id
        async with services.pool.acquire() as conn, conn.transaction():
            run_id = await services.engine.create_run(
                conn,
                RunRequest(
                    pipeline=pipeline,
                    labels=labels,
                    repository=str(labels.get("repository", "")),
                    sha=str(labels.get("sha", "")),
                    ref=str(labels.get("ref", "")),
                    only_jobs=jobs or None,
                    pinned_to=services.worker.worker_id,
                ),
            )
        if services.embedded is not None:
            where = services.embedded.data_dir
            print(f"{_clock()} database: embedded Postgres, data in {where}", file=out)
        print(f"{_clock()} run {run_id} started: {services.engine.run_url(run_id)}", file=out)
        await services.start_background()
        printer = ProgressPrinter(services.pool, run_id, out)
        stop_reason = await _follow(services, printer, run_id, timeout_s)
        if stop_reason is not None:
            print(f"{_clock()} {stop_reason}: cancelling run {run_id}", file=out, flush=True)
            async with services.pool.acquire() as conn, conn.transaction():
                await services.engine.cancel_run(conn, run_id, reason=stop_reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_GRACE_S):
                    while not await _settled(services.pool, run_id):
                        await printer.poll()
                        await asyncio.sleep(POLL_S)
        await printer.poll()
        state = await print_summary(services.pool, run_id, out)
    if stop_reason is not None and stop_reason.startswith("interrupted"):
        return 130
    return 0 if state == "succeeded" else 1


async def _follow(
    services: Services, printer: ProgressPrinter, run_id: int, timeout_s: float
) -> str | None:
    """Print progress until the run settles; return why it must stop early, if it must.

    SIGINT and SIGTERM stop it early, so that the run is cancelled, not left running.
    """
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await printer.poll()
            if await _settled(services.pool, run_id):
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), POLL_S)
            if interrupted.is_set():
                return "interrupted by a signal"
        return f"kubeci run gave up after {timeout_s:g} s"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
