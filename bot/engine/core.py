"""The engine's state machine: runs, jobs, steps, tasks and attempts.

Every public method takes a connection inside a transaction and makes one state change
with all its consequences (events, notifier rows, the next step, the run's outcome), so
the caller's commit makes them durable together. Decisions inside one job are
serialised by locking the job's row; the run's row is locked when a job ends. A task's
completion without a step handler or a retry locks only its task (see `complete_attempt`).

Outcome rules:
- A step waits for its tasks and succeeds when every task that ran succeeded or allows
  failure. A task event handler (`set_step_success`, `set_step_failure`) ends the step at
  once; the first decision wins and later ones are recorded as ignored.
- Ending a step cancels its running interruptible tasks. Non-interruptible tasks run on
  "detached": their outcome is recorded but no longer changes the step.
- A failed step fails the job; a succeeded one starts the next step. A step event
  handler (`set_job_success`, `set_job_failure`) ends the job at once.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from bot.actions.base import AttemptResult
from bot.config import Settings
from bot.engine import rows
from bot.engine.events import Event, EventHook, RunInfo, Scope, insert_event, run_hooks
from bot.engine.notify import enqueue_notifiers
from bot.net.http import backoff_delay_s
from bot.store.db import Connection, notify
from bot.store.text import clean_text
from pipelines_schema.models import Job, Pipeline, to_dict
from pipelines_schema.rules import matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """Everything needed to create a run."""

    pipeline: Pipeline
    labels: dict[str, Any]
    forge: str = "manual"
    repository: str = ""
    sha: str = ""
    ref: str = ""
    pr_number: int | None = None
    trusted: bool = True
    source: dict[str, Any] = field(default_factory=dict)
    delivery_pk: int | None = None
    # Base of the superseding key, e.g. "github:acme/web#pr:5"; empty disables superseding.
    group_base: str = ""
    only_jobs: Sequence[str] | None = None
    # Only the process of this name runs and reports the run (see Worker.pinned_to).
    pinned_to: str | None = None


# Upper bounds on the wait before a retry, so a huge backoff or Retry-After can neither
# overflow a timestamp nor park a task for years.
MAX_RETRY_AFTER_S = 3600.0
MAX_RETRY_DELAY_S = 7 * 24 * 3600.0


def retry_delay_s(
    attempt_number: int, backoff: dict[str, Any], retry_after_s: float | None
) -> float:
    """Delay before attempt `attempt_number + 1`: the task's backoff with equal jitter,
    at least the target's Retry-After (at most MAX_RETRY_AFTER_S), and never more than
    MAX_RETRY_DELAY_S."""
    delay_s = backoff_delay_s(
        attempt_number,
        float(backoff.get("initial_s", 5.0)),
        float(backoff.get("factor", 2.0)),
        float(backoff.get("max_s", 300.0)),
    )
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, MAX_RETRY_AFTER_S))
    return min(delay_s, MAX_RETRY_DELAY_S)


_UNLOCKED_SAVEPOINT = "completion_without_job_lock"


class _NeedsJobLock(Exception):
    """The completion must be recorded again under the job's lock."""


@dataclass
class _Completion:
    """An attempt's outcome as handed to `Engine.complete_attempt`."""

    attempt_id: int
    task_id: int
    result: AttemptResult
    owner: str | None
    cancelled: bool
    # True while the work runs inside _UNLOCKED_SAVEPOINT and can still be rolled back.
    in_savepoint: bool = False


def _can_retry(task: asyncpg.Record, result: AttemptResult) -> bool:
    return bool(
        result.retryable and task["attempts"] < task["max_attempts"] and not task["detached"]
    )


def _step_handler(task: asyncpg.Record, outcome: str) -> str | None:
    """Return the task's handler for `outcome` when it decides the step, else None."""
    handler = task["spec"].get("event_handlers", {}).get(outcome)
    return handler if handler in ("set_step_success", "set_step_failure") else None


def _needs_job_lock(task: asyncpg.Record, state: str, result: AttemptResult) -> bool:
    """Whether recording `state` for a running task's attempt needs the job's lock: a
    retry, or an outcome with a step handler."""
    if state == "failed" and _can_retry(task, result):
        return True
    return not task["detached"] and _step_handler(task, state) is not None


def storable(result: AttemptResult) -> AttemptResult:
    """Return `result` with texts Postgres can store (no NUL, no lone surrogates)."""
    excerpt = result.response_excerpt
    return dataclasses.replace(
        result,
        message=clean_text(result.message),
        response_excerpt=clean_text(excerpt) if excerpt is not None else None,
    )


class Engine:
    """State changes of runs. Stateless apart from configuration: safe to share."""

    def __init__(self, settings: Settings, hooks: Sequence[EventHook] = ()) -> None:
        self.settings = settings
        self.hooks: list[EventHook] = list(hooks)

    def run_url(self, run_id: int) -> str:
        return f"{self.settings.callback_base_url}/runs/{run_id}"

    async def run_info(self, conn: Connection, run_id: int) -> RunInfo:
        return RunInfo.from_row(await rows.fetch_run(conn, run_id), self.run_url(run_id))

    # ---- events -------------------------------------------------------------------------

    async def _emit(
        self,
        conn: Connection,
        scope: Scope,
        name: str,
        notifiers: Sequence[dict[str, Any]] = (),
        **details: Any,
    ) -> Event:
        event = await insert_event(conn, scope, name, **details)
        await enqueue_notifiers(conn, notifiers, event, scope.run)
        await run_hooks(conn, self.hooks, event, scope.run)
        return event

    # ---- creating runs ------------------------------------------------------------------

    async def create_run(self, conn: Connection, request: RunRequest) -> int:
        """Insert a run with its jobs, steps and tasks, and start the jobs whose rules match."""
        run_id = await conn.fetchval(
            "INSERT INTO runs (state, started_at, forge, repository, sha, ref, pr_number,"
            " trusted, labels, pipeline, source, delivery_pk, pinned_to)"
            " VALUES ('running', now(), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " RETURNING id",
            request.forge,
            request.repository,
            request.sha,
            request.ref,
            request.pr_number,
            request.trusted,
            request.labels,
            to_dict(request.pipeline),
            request.source,
            request.delivery_pk,
            request.pinned_to,
        )
        job_ids = []
        for position, job in enumerate(request.pipeline.jobs):
            if request.only_jobs is not None and job.name not in request.only_jobs:
                continue
            job_ids.append(await self._insert_job(conn, run_id, position, job, request))
        run = await self.run_info(conn, run_id)
        log.info(
            "run created with %d job(s)",
            len(job_ids),
            extra={"run_id": run_id, "repository": request.repository},
        )
        for job_id in job_ids:
            await self._supersede_older(conn, job_id, request.sha)
        for job_id in job_ids:
            await self._start_job(conn, run, job_id)
        await self._maybe_finish_run(conn, run_id)
        return int(run_id)

    async def _insert_job(
        self, conn: Connection, run_id: int, position: int, job: Job, request: RunRequest
    ) -> int:
        job_dict = to_dict(Pipeline(jobs=(job,)))["jobs"][0]
        steps = job_dict.pop("steps")
        group_key = f"{request.group_base}/{job.name}" if request.group_base else ""
        job_id = await conn.fetchval(
            "INSERT INTO jobs (run_id, position, name, group_key, spec)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            run_id,
            position,
            job.name,
            group_key,
            job_dict,
        )
        for step_pos, step in enumerate(steps):
            tasks = step.pop("tasks")
            step_id = await conn.fetchval(
                "INSERT INTO steps (job_id, position, name, spec) VALUES ($1, $2, $3, $4)"
                " RETURNING id",
                job_id,
                step_pos,
                step["name"],
                step,
            )
            await conn.executemany(
                "INSERT INTO tasks (step_id, run_id, position, name, action, max_attempts,"
                " allow_failure, interruptible, idempotency_key, timeout_s, spec)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                [
                    (
                        step_id,
                        run_id,
                        task_pos,
                        task["name"],
                        task["action"],
                        int(task["retries"]) + 1,
                        task["allow_failure"],
                        task["interruptible"],
                        uuid.uuid4().hex,
                        float(task["timeout_s"]),
                        task,
                    )
                    for task_pos, task in enumerate(tasks)
                ],
            )
        return int(job_id)

    async def _supersede_older(self, conn: Connection, job_id: int, sha: str) -> None:
        job = await conn.fetchrow("SELECT run_id, group_key FROM jobs WHERE id = $1", job_id)
        assert job is not None
        if not job["group_key"]:
            return
        older = await conn.fetch(
            "SELECT id FROM jobs WHERE group_key = $1 AND run_id < $2"
            " AND state IN ('pending', 'running') ORDER BY id",
            job["group_key"],
            job["run_id"],
        )
        if older:
            await self.cancel_jobs(
                conn,
                [row["id"] for row in older],
                reason=f"superseded by {sha[:12]}" if sha else "superseded by a newer run",
                superseded_by=sha or None,
            )

    # ---- jobs and steps -----------------------------------------------------------------

    async def _start_job(self, conn: Connection, run: RunInfo, job_id: int) -> None:
        job = await rows.lock_job(conn, job_id)
        if job["state"] != "pending":
            return
        rule = (await rows.fetch_job_model(conn, run.id, job["position"])).rules
        if not matches(rule, run.labels):
            await rows.set_state(conn, "jobs", job_id, "skipped", message="rules did not match")
            await conn.execute("UPDATE steps SET state = 'skipped' WHERE job_id = $1", job_id)
            await conn.execute(
                "UPDATE tasks SET state = 'skipped' WHERE step_id IN"
                " (SELECT id FROM steps WHERE job_id = $1)",
                job_id,
            )
            return
        timeout_s = job["spec"].get("timeout_s")
        deadline = {"deadline_at": None}
        if timeout_s:
            deadline = {
                "deadline_at": await conn.fetchval(
                    "SELECT now() + $1::interval", timedelta(seconds=float(timeout_s))
                )
            }
        await rows.set_state(conn, "jobs", job_id, "running", extra=deadline)
        scope = Scope(run=run, job_id=job_id, job=job["name"])
        await self._emit(conn, scope, "started", job["spec"].get("notifiers", ()), state="running")
        await self._start_step(conn, run, job_id, 0)

    async def _start_step(self, conn: Connection, run: RunInfo, job_id: int, position: int) -> None:
        """Start the first step at or after `position` whose rules match."""
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        assert job is not None
        steps = (await rows.fetch_job_model(conn, run.id, job["position"])).steps
        while position < len(steps) and not matches(steps[position].rules, run.labels):
            step = await rows.fetch_step_at(conn, job_id, position)
            assert step is not None
            await rows.set_state(
                conn, "steps", step["id"], "skipped", message="rules did not match"
            )
            await conn.execute("UPDATE tasks SET state = 'skipped' WHERE step_id = $1", step["id"])
            position += 1

        if position >= len(steps):
            await self._finish_job(conn, run, job_id, "succeeded", decided_by="default")
            return

        step = await rows.fetch_step_at(conn, job_id, position)
        assert step is not None
        await conn.execute("UPDATE jobs SET current_step = $2 WHERE id = $1", job_id, position)
        await rows.set_state(conn, "steps", step["id"], "running")
        scope = Scope(
            run=run, job_id=job_id, job=job["name"], step_id=step["id"], step=step["name"]
        )
        await self._emit(conn, scope, "started", step["spec"].get("notifiers", ()), state="running")

        to_start = []
        for task, model in zip(
            await rows.fetch_step_tasks(conn, step["id"]), steps[position].tasks, strict=True
        ):
            if not matches(model.rules, run.labels):
                await rows.set_state(
                    conn, "tasks", task["id"], "skipped", message="rules did not match"
                )
                continue
            to_start.append(task)

        if not to_start:
            await self._decide_step(conn, run, step["id"], "succeeded", decided_by="default")
            return

        shards = rows.counter_shards(len(to_start))
        for index, task in enumerate(to_start):
            await self._start_task(conn, scope, task, index % shards)
        await rows.start_step_counters(conn, step["id"], len(to_start), shards)
        # One wake-up per step: Postgres would fold a notification per task into one.
        await notify(conn, "attempts")

    async def _start_task(
        self, conn: Connection, step_scope: Scope, task: asyncpg.Record, shard: int
    ) -> None:
        extra = {"attempts": 1, "counter_shard": shard}
        await rows.set_state(conn, "tasks", task["id"], "running", extra=extra)
        await conn.execute(
            "INSERT INTO attempts (task_id, number, state, due_at) VALUES ($1, 1, 'queued', now())",
            task["id"],
        )
        scope = self._task_scope(step_scope, task)
        await self._emit(conn, scope, "started", task["spec"].get("notifiers", ()), state="running")

    @staticmethod
    def _task_scope(step_scope: Scope, task: asyncpg.Record) -> Scope:
        return Scope(
            run=step_scope.run,
            job_id=step_scope.job_id,
            job=step_scope.job,
            step_id=step_scope.step_id,
            step=step_scope.step,
            task_id=task["id"],
            task=task["name"],
        )

    async def _step_scope(self, conn: Connection, run: RunInfo, step_id: int) -> Scope:
        row = await conn.fetchrow(
            "SELECT s.id, s.name, j.id AS job_id, j.name AS job_name"
            " FROM steps s JOIN jobs j ON j.id = s.job_id WHERE s.id = $1",
            step_id,
        )
        assert row is not None
        return Scope(
            run=run, job_id=row["job_id"], job=row["job_name"], step_id=step_id, step=row["name"]
        )

    # ---- attempts and tasks -------------------------------------------------------------

    async def complete_attempt(
        self,
        conn: Connection,
        attempt_id: int,
        result: AttemptResult,
        *,
        owner: str | None = None,
        cancelled: bool = False,
    ) -> bool:
        """Record an attempt's outcome and everything that follows from it.

        Returns False, changing nothing, when the attempt is no longer active (a callback
        or another process completed it first) or, with `owner`, when that process no
        longer holds its lease.

        Most completions end a task that has no step handler while the step still waits
        for other tasks. Those run without the job's lock: they lock the task and
        decrement its shard of `step_counters`, so completions of one step run in
        parallel. A completion that brings its shard to 0 locks the job (NOWAIT) and
        decides the step by default if no task it waits for is still active. A
        completion that needs the job's lock otherwise (a step handler, a retry, a job
        lock held by another transaction) rolls back to a savepoint and runs again under
        the lock. `conn` must be inside a transaction.
        """
        ids = await rows.attempt_owner_ids(conn, attempt_id)
        if ids is None:
            return False
        result = storable(result)
        step_scope = Scope(
            run=RunInfo.from_row(ids, self.run_url(ids["run_id"])),
            job_id=ids["job_id"],
            job=ids["job_name"],
            step_id=ids["step_id"],
            step=ids["step_name"],
        )
        completion = _Completion(attempt_id, ids["task_id"], result, owner, cancelled)
        await conn.execute(f"SAVEPOINT {_UNLOCKED_SAVEPOINT}")
        completion.in_savepoint = True
        try:
            return await self._record_completion(conn, step_scope, completion, job_locked=False)
        except (_NeedsJobLock, asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            if not completion.in_savepoint:
                raise
            log.debug(
                "completion needs the job's lock (%s)",
                type(exc).__name__,
                extra={"attempt_id": attempt_id, "run_id": ids["run_id"]},
            )
        # Release the savepoint too: what follows must run in the top-level transaction,
        # because the reporter detects its own outbox rows by the transaction id.
        await conn.execute(
            f"ROLLBACK TO SAVEPOINT {_UNLOCKED_SAVEPOINT}; RELEASE SAVEPOINT {_UNLOCKED_SAVEPOINT}"
        )
        completion.in_savepoint = False
        await rows.lock_job(conn, ids["job_id"])
        return await self._record_completion(conn, step_scope, completion, job_locked=True)

    async def _record_completion(
        self, conn: Connection, step_scope: Scope, completion: _Completion, *, job_locked: bool
    ) -> bool:
        """Record the attempt's outcome; without `job_locked`, raise _NeedsJobLock when
        the outcome needs the job's lock."""
        task = await rows.lock_task(conn, completion.task_id)
        attempt = await conn.fetchrow(
            "SELECT * FROM attempts WHERE id = $1 FOR UPDATE", completion.attempt_id
        )
        assert attempt is not None
        if attempt["state"] not in ("running", "waiting"):
            return False
        owner = completion.owner
        if owner is not None and (attempt["state"] != "running" or attempt["lease_owner"] != owner):
            return False
        result = completion.result
        state = "cancelled" if completion.cancelled else result.outcome
        if not job_locked and task["state"] == "running" and _needs_job_lock(task, state, result):
            raise _NeedsJobLock
        # One statement ends the attempt and uses up its callback tokens.
        await conn.execute(
            "WITH used AS (UPDATE callbacks SET used_at = coalesce(used_at, now())"
            " WHERE attempt_id = $1)"
            " UPDATE attempts SET state = $2, finished_at = now(), message = $3,"
            " response_status = coalesce($4, response_status),"
            " response_excerpt = coalesce($5, response_excerpt),"
            " lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
            completion.attempt_id,
            state,
            result.message,
            result.response_status,
            result.response_excerpt,
        )
        if task["state"] != "running":
            return True  # the task was cancelled or ended already; the attempt is only recorded
        scope = self._task_scope(step_scope, task)
        unlocked = None if job_locked else completion
        if state in ("cancelled", "succeeded"):
            await self._end_task(conn, scope, task, state, result.message, unlocked=unlocked)
            return True
        await self._attempt_failed(conn, scope, task, attempt, result, unlocked=unlocked)
        return True

    async def _attempt_failed(
        self,
        conn: Connection,
        scope: Scope,
        task: asyncpg.Record,
        attempt: asyncpg.Record,
        result: AttemptResult,
        *,
        unlocked: _Completion | None,
    ) -> None:
        notifiers = task["spec"].get("notifiers", ())
        await self._emit(
            conn,
            scope,
            "attempt_failed",
            notifiers,
            state="failed",
            message=result.message,
            attempt=attempt["number"],
        )
        if not _can_retry(task, result):
            await self._end_task(conn, scope, task, "failed", result.message, unlocked=unlocked)
            return
        backoff = task["spec"].get("backoff", {})
        delay_s = retry_delay_s(attempt["number"], backoff, result.retry_after_s)
        number = task["attempts"] + 1
        await conn.execute("UPDATE tasks SET attempts = $2 WHERE id = $1", task["id"], number)
        await conn.execute(
            "INSERT INTO attempts (task_id, number, state, due_at)"
            " VALUES ($1, $2, 'queued', now() + $3::interval)",
            task["id"],
            number,
            timedelta(seconds=delay_s),
        )
        log.info(
            "attempt %d failed (%s); attempt %d in %.1f s",
            attempt["number"],
            result.message,
            number,
            delay_s,
            extra={"run_id": scope.run.id, "task_id": task["id"]},
        )
        await notify(conn, "attempts")

    async def _end_task(
        self,
        conn: Connection,
        scope: Scope,
        task: asyncpg.Record,
        outcome: str,
        message: str,
        *,
        unlocked: _Completion | None = None,
    ) -> None:
        """Set a task's final state, emit its events and apply its event handler.

        `unlocked` is the completion when it runs without the job's lock.
        """
        await rows.set_state(conn, "tasks", task["id"], outcome, message=message)
        notifiers = task["spec"].get("notifiers", ())
        if outcome in ("succeeded", "failed"):
            await self._emit(conn, scope, outcome, notifiers, state=outcome, message=message)
        await self._emit(conn, scope, "complete", notifiers, state=outcome, message=message)
        log.info(
            "task %s %s",
            task["name"],
            outcome,
            extra={"run_id": scope.run.id, "task_id": task["id"]},
        )
        if task["detached"]:
            await self._record_ignored_handler(
                conn, scope, task["spec"], outcome, "the step had ended"
            )
            return
        handler = _step_handler(task, outcome)
        assert scope.step_id is not None and scope.job_id is not None
        if handler is not None:
            assert unlocked is None, "a step handler is applied under the job's lock"
            decision = "succeeded" if handler == "set_step_success" else "failed"
            await self._decide_step(
                conn, scope.run, scope.step_id, decision, decided_by=f"{task['name']}:{handler}"
            )
            return
        remaining = await rows.end_counted_task(conn, scope.step_id, task["counter_shard"])
        if remaining is not None and remaining > 0:
            return  # the step still waits for tasks of this shard, and they decide it
        if unlocked is not None:
            if remaining is None:
                raise _NeedsJobLock
            # NOWAIT: this transaction holds the task's row, and a holder of the job's
            # lock may be waiting for it to cancel the task.
            await rows.lock_job(conn, scope.job_id, nowait=True)
            # The decision may finish the job and the run, and the reporter recognises
            # the outbox rows of the current transaction by their xmin, which differs
            # inside a savepoint. So the rest runs in the top-level transaction.
            await conn.execute(f"RELEASE SAVEPOINT {_UNLOCKED_SAVEPOINT}")
            unlocked.in_savepoint = False
        await self._decide_step_by_default(conn, scope.run, scope.step_id)

    async def _record_ignored_handler(
        self, conn: Connection, scope: Scope, spec: dict[str, Any], outcome: str, why: str
    ) -> None:
        handler = spec.get("event_handlers", {}).get(outcome)
        if handler:
            await insert_event(
                conn,
                scope,
                "handler_ignored",
                state=outcome,
                message=f"{handler} on {outcome} ignored: {why}",
            )

    async def _decide_step_by_default(self, conn: Connection, run: RunInfo, step_id: int) -> None:
        tasks = await rows.fetch_step_outcomes(conn, step_id)
        attached = [task for task in tasks if not task["detached"]]
        if any(task["state"] in rows.ACTIVE_STATES for task in attached):
            return
        failed = [
            task["name"]
            for task in attached
            if task["state"] in ("failed", "cancelled") and not task["allow_failure"]
        ]
        outcome = "failed" if failed else "succeeded"
        message = f"failed task(s): {', '.join(failed)}" if failed else ""
        await self._decide_step(conn, run, step_id, outcome, decided_by="default", message=message)

    async def _decide_step(
        self,
        conn: Connection,
        run: RunInfo,
        step_id: int,
        outcome: str,
        *,
        decided_by: str,
        message: str = "",
    ) -> None:
        step = await rows.fetch_step(conn, step_id)
        scope = await self._step_scope(conn, run, step_id)
        if step["state"] != "running":
            await insert_event(
                conn,
                scope,
                "decision_ignored",
                state=outcome,
                message=f"{decided_by} ignored: the step is already {step['state']}",
            )
            return

        await rows.set_state(
            conn, "steps", step_id, outcome, message=message, extra={"decided_by": decided_by}
        )
        await self._stop_running_tasks(conn, scope, step_id, f"step ended by {decided_by}")
        notifiers = step["spec"].get("notifiers", ())
        await self._emit(conn, scope, outcome, notifiers, state=outcome, message=message)
        await self._emit(conn, scope, "complete", notifiers, state=outcome, message=message)

        # What follows the step: the job's handler, the default failure, or the next step.
        assert scope.job_id is not None
        job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", scope.job_id)
        assert job is not None
        if job["state"] != "running":
            await self._record_ignored_handler(
                conn, scope, step["spec"], outcome, "the job had ended"
            )
            return
        handler = step["spec"].get("event_handlers", {}).get(outcome)
        if handler in ("set_job_success", "set_job_failure"):
            decision = "succeeded" if handler == "set_job_success" else "failed"
            await self._finish_job(
                conn, run, scope.job_id, decision, decided_by=f"{step['name']}:{handler}"
            )
        elif outcome == "failed":
            await self._finish_job(
                conn,
                run,
                scope.job_id,
                "failed",
                decided_by="default",
                message=f"step {step['name']} failed",
            )
        else:
            await self._start_step(conn, run, scope.job_id, step["position"] + 1)

    async def _stop_running_tasks(
        self, conn: Connection, step_scope: Scope, step_id: int, reason: str
    ) -> None:
        """Cancel a step's running interruptible tasks; detach the non-interruptible ones."""
        for task in await rows.fetch_step_tasks(conn, step_id):
            if task["state"] not in rows.ACTIVE_STATES or task["detached"]:
                continue
            if not task["interruptible"]:
                # The state check runs again if a completion ended the task meanwhile.
                await conn.execute(
                    "UPDATE tasks SET detached = true WHERE id = $1"
                    " AND state IN ('pending', 'running')",
                    task["id"],
                )
                continue
            await self._cancel_task(conn, self._task_scope(step_scope, task), task, reason)

    async def _cancel_task(
        self, conn: Connection, scope: Scope, task: asyncpg.Record, reason: str
    ) -> None:
        if not await rows.cancel_task_row(conn, task["id"], reason):
            return  # a completion without the job's lock ended the task first
        # Queued and parked attempts end here. A running one is stopped by the worker
        # running it, which reads cancel_requested on its next heartbeat or NOTIFY.
        await conn.execute(
            "UPDATE attempts SET state = 'cancelled', finished_at = now(), message = $2"
            " WHERE task_id = $1 AND state IN ('queued', 'waiting')",
            task["id"],
            reason,
        )
        stopping = await conn.execute(
            "UPDATE attempts SET cancel_requested = true WHERE task_id = $1 AND state = 'running'",
            task["id"],
        )
        if stopping != "UPDATE 0":
            await notify(conn, "cancel")
        await conn.execute(
            "UPDATE callbacks SET used_at = coalesce(used_at, now()) WHERE attempt_id IN"
            " (SELECT id FROM attempts WHERE task_id = $1)",
            task["id"],
        )
        notifiers = task["spec"].get("notifiers", ())
        await self._emit(conn, scope, "complete", notifiers, state="cancelled", message=reason)

    # ---- ending jobs and runs -----------------------------------------------------------

    async def _finish_job(
        self,
        conn: Connection,
        run: RunInfo,
        job_id: int,
        outcome: str,
        *,
        decided_by: str,
        message: str = "",
        superseded_by: str | None = None,
    ) -> None:
        job = await rows.lock_job(conn, job_id)
        scope = Scope(run=run, job_id=job_id, job=job["name"])
        if job["state"] not in rows.ACTIVE_STATES:
            await insert_event(
                conn,
                scope,
                "decision_ignored",
                state=outcome,
                message=f"{decided_by} ignored: the job is already {job['state']}",
            )
            return
        extra: dict[str, Any] = {}
        if superseded_by is not None:
            extra["superseded_by"] = superseded_by
        await rows.set_state(conn, "jobs", job_id, outcome, message=message, extra=extra)
        for step in await conn.fetch("SELECT * FROM steps WHERE job_id = $1", job_id):
            if step["state"] == "running":
                await rows.set_state(conn, "steps", step["id"], "cancelled", message=message)
                step_scope = await self._step_scope(conn, run, step["id"])
                await self._stop_running_tasks(conn, step_scope, step["id"], message or outcome)
                await self._emit(
                    conn,
                    step_scope,
                    "complete",
                    step["spec"].get("notifiers", ()),
                    state="cancelled",
                    message=message,
                )
            elif step["state"] == "pending":
                await rows.set_state(conn, "steps", step["id"], "skipped")
                await conn.execute(
                    "UPDATE tasks SET state = 'skipped' WHERE step_id = $1 AND state = 'pending'",
                    step["id"],
                )
        notifiers = job["spec"].get("notifiers", ())
        if outcome in ("succeeded", "failed"):
            await self._emit(conn, scope, outcome, notifiers, state=outcome, message=message)
        await self._emit(conn, scope, "complete", notifiers, state=outcome, message=message)
        log.info("job %s %s (%s)", job["name"], outcome, decided_by, extra={"run_id": run.id})
        await self._maybe_finish_run(conn, run.id)

    async def _maybe_finish_run(self, conn: Connection, run_id: int) -> None:
        run_row = await rows.fetch_run(conn, run_id, lock=True)
        if run_row["state"] != "running":
            return
        states = [
            r["state"] for r in await conn.fetch("SELECT state FROM jobs WHERE run_id = $1", run_id)
        ]
        if any(state in rows.ACTIVE_STATES for state in states):
            return
        if "failed" in states:
            outcome = "failed"
        elif "cancelled" in states:
            outcome = "cancelled"
        else:
            outcome = "succeeded"
        message = "" if states and set(states) != {"skipped"} else "no job's rules matched"
        await rows.set_state(conn, "runs", run_id, outcome, message=message)
        run = RunInfo.from_row(run_row, self.run_url(run_id))
        await self._emit(conn, Scope(run=run), "complete", (), state=outcome, message=message)
        log.info("run %s", outcome, extra={"run_id": run_id})

    async def cancel_jobs(
        self,
        conn: Connection,
        job_ids: Sequence[int],
        *,
        reason: str,
        superseded_by: str | None = None,
    ) -> int:
        """Cancel active jobs; return how many were still active."""
        # Lock every job first, in id order: ending a job locks its run, and a worker that
        # holds one of the later jobs while waiting for that run would otherwise deadlock.
        await conn.execute(
            "SELECT id FROM jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
            list(job_ids),
        )
        cancelled = 0
        for job_id in job_ids:
            job = await rows.lock_job(conn, job_id)
            if job["state"] not in rows.ACTIVE_STATES:
                continue
            run = await self.run_info(conn, job["run_id"])
            await self._finish_job(
                conn,
                run,
                job_id,
                "cancelled",
                decided_by="cancel",
                message=reason,
                superseded_by=superseded_by,
            )
            cancelled += 1
        return cancelled

    async def cancel_run(self, conn: Connection, run_id: int, *, reason: str) -> int:
        job_ids = [
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM jobs WHERE run_id = $1 AND state IN ('pending', 'running')"
                " ORDER BY id",
                run_id,
            )
        ]
        return await self.cancel_jobs(conn, job_ids, reason=reason)

    # ---- deadlines ----------------------------------------------------------------------

    async def expire_job(self, conn: Connection, job_id: int) -> bool:
        """Fail a running job whose deadline has passed; return whether it did."""
        job = await rows.lock_job(conn, job_id)
        if job["state"] != "running" or job["deadline_at"] is None:
            return False
        overdue = await conn.fetchval("SELECT $1 <= now()", job["deadline_at"])
        if not overdue:
            return False
        run = await self.run_info(conn, job["run_id"])
        timeout_s = job["spec"].get("timeout_s")
        await self._finish_job(
            conn,
            run,
            job_id,
            "failed",
            decided_by="timeout",
            message=f"job timed out after {timeout_s} s",
        )
        return True
