"""The worker: claims due attempts, runs their actions, and records the outcomes.

Attempts are claimed with `FOR UPDATE SKIP LOCKED` under a lease that a heartbeat renews.
An attempt whose lease expired (its process died) is claimed again by any worker, which
runs it with `recovered=True` so the action can re-attach to what the first one started.
`LISTEN kubeci_wake` wakes an idle worker; polling every `poll_interval_s` is the
fallback. The same loop also fails overdue jobs and parked attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from bot.actions.base import Action, AttemptContext, AttemptResult
from bot.engine.context import (
    CLAIMED_ATTEMPT_SQL,
    AttemptRow,
    PlaceholderError,
    SecretSource,
    build_context,
)
from bot.engine.core import Engine, storable
from bot.store.db import DB_ERRORS, WAKE_CHANNEL

log = logging.getLogger(__name__)

# Queued and expired attempts are found through their own partial indexes, so a claim
# reads a few index entries however many attempts the table holds. Queued attempts due at
# the same instant are taken in index order, not strictly by id.
# NOTE: an index on attempts (due_at, id) WHERE state = 'queued' would keep the id order.
CLAIM_SQL = """
WITH expired AS (
    SELECT a.id, a.state AS old_state, a.due_at
    FROM attempts a
    JOIN tasks t ON t.id = a.task_id
    JOIN runs r ON r.id = t.run_id
    WHERE a.state = 'running' AND a.lease_expires_at < now()
      AND r.pinned_to IS NOT DISTINCT FROM $4
    ORDER BY a.lease_expires_at
    LIMIT $2
    FOR UPDATE OF a SKIP LOCKED
), queued AS (
    SELECT a.id, a.state AS old_state, a.due_at
    FROM attempts a
    JOIN tasks t ON t.id = a.task_id
    JOIN runs r ON r.id = t.run_id
    WHERE a.state = 'queued' AND a.due_at <= now()
      AND r.pinned_to IS NOT DISTINCT FROM $4
    ORDER BY a.due_at
    LIMIT $2
    FOR UPDATE OF a SKIP LOCKED
), due AS (
    SELECT id, old_state FROM (SELECT * FROM expired UNION ALL SELECT * FROM queued) found
    ORDER BY due_at, id
    LIMIT $2
)
UPDATE attempts a
SET state = 'running',
    lease_owner = $1,
    lease_expires_at = now() + $3::interval,
    started_at = coalesce(a.started_at, now()),
    deadline_at = coalesce(a.deadline_at, now() + t.timeout_s * interval '1 second')
FROM due, tasks t
WHERE a.id = due.id AND t.id = a.task_id
RETURNING a.id, due.old_state, a.cancel_requested
"""

# How long an action's `cancel` may take to clean up after a cancelled attempt.
CANCEL_CLEAN_UP_S = 60.0

HEARTBEAT_SQL = """
UPDATE attempts SET lease_expires_at = now() + $3::interval
WHERE id = ANY($2::bigint[]) AND lease_owner = $1 AND state = 'running'
RETURNING id, cancel_requested
"""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        engine: Engine,
        actions: Mapping[str, Action],
        secrets: SecretSource,
        *,
        worker_id: str = "",
        concurrency: int = 32,
        lease_s: float = 30.0,
        poll_interval_s: float = 2.0,
        action_extra: dict[str, Any] | None = None,
        pinned_to: str | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.actions = dict(actions)
        self.secrets = secrets
        self.worker_id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease = timedelta(seconds=lease_s)
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.action_extra = action_extra or {}
        # None: run attempts of unpinned runs. A name: only those of runs pinned to it.
        self.pinned_to = pinned_to
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self._contexts: dict[int, AttemptContext] = {}
        self._cancelled: set[int] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: PoolConnectionProxy[asyncpg.Record] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def log_extra(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id}

    # ---- life cycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run attempts until stop() is called."""
        loops: list[asyncio.Task[None]] = []
        try:
            await self._listen()
            log.info("worker started (concurrency %d)", self.concurrency, extra=self.log_extra)
            loops = [
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._sweep_loop(), name="sweep"),
            ]
            await self._claim_loop()
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._unlisten()
            await self._close_actions()
            log.info("worker stopped", extra=self.log_extra)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming, let running attempts finish for `grace_s`, then hand back leases.

        An attempt still running after the grace period is cancelled locally and its
        lease is released at once, so another process takes it over (and re-attaches to
        any Kubernetes Job it started).
        """
        self._stopping.set()
        self._wake.set()
        pending = list(self.inflight.values())
        if pending:
            _, still_running = await asyncio.wait(pending, timeout=grace_s)
            handed_back = [aid for aid, task in self.inflight.items() if task in still_running]
            for attempt_id in handed_back:
                ctx = self._contexts.get(attempt_id)
                if ctx is not None:
                    ctx.handing_back = True
            for task in still_running:
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
            if handed_back:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE attempts SET lease_expires_at = now() - interval '1 second'"
                        " WHERE id = ANY($1::bigint[]) AND lease_owner = $2 AND state = 'running'",
                        handed_back,
                        self.worker_id,
                    )
                log.info("handed back %d lease(s)", len(handed_back), extra=self.log_extra)

    async def _close_actions(self) -> None:
        """Close what actions keep open between attempts, such as the webhook action's
        HTTP session. An action used again afterwards opens it anew."""
        for action in self.actions.values():
            close = getattr(action, "close", None)
            if close is not None:
                await close()

    async def _listen(self) -> None:
        try:
            conn = await self.pool.acquire()
        except DB_ERRORS as exc:
            log.warning("LISTEN failed, polling only: %s", exc, extra=self.log_extra)
            return
        try:
            await conn.add_listener(WAKE_CHANNEL, self._on_notify)
        except BaseException as exc:
            # Cancellation included: the connection must go back to the pool.
            await self.pool.release(conn)
            if not isinstance(exc, DB_ERRORS):
                raise
            log.warning("LISTEN failed, polling only: %s", exc, extra=self.log_extra)
            return
        self._listener = conn

    async def _unlisten(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(*DB_ERRORS):
                await self._listener.remove_listener(WAKE_CHANNEL, self._on_notify)
            await self.pool.release(self._listener)
            self._listener = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "attempts":
            self._wake.set()
        elif payload == "cancel" and self.inflight:
            # Stop cancelled attempts now instead of at the next heartbeat.
            task = asyncio.get_running_loop().create_task(self._heartbeat_once())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- claiming -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            claimed = 0
            free = self.concurrency - len(self.inflight)
            if free > 0:
                try:
                    claimed = await self.claim_and_start(free)
                except DB_ERRORS as exc:
                    log.warning("claiming attempts failed: %s", exc, extra=self.log_extra)
                except Exception:  # the claim loop must outlive a bug in one round
                    log.exception("claiming attempts raised", extra=self.log_extra)
            if claimed and claimed == free:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)

    async def claim_and_start(self, limit: int) -> int:
        """Claim up to `limit` due attempts and start running each; return how many."""
        async with self.pool.acquire() as conn:
            claimed = await conn.fetch(CLAIM_SQL, self.worker_id, limit, self.lease, self.pinned_to)
        for row in claimed:
            attempt_id = int(row["id"])
            recovered = row["old_state"] == "running"
            if recovered:
                log.info(
                    "recovered attempt with an expired lease", extra={"attempt_id": attempt_id}
                )
            if row["cancel_requested"]:
                task = asyncio.create_task(self._clean_up_cancelled(attempt_id))
            else:
                task = asyncio.create_task(self._run_attempt(attempt_id, recovered))
            self.inflight[attempt_id] = task
            task.add_done_callback(functools.partial(self._finished, attempt_id))
        return len(claimed)

    def _finished(self, attempt_id: int, _task: object = None) -> None:
        self.inflight.pop(attempt_id, None)
        self._contexts.pop(attempt_id, None)
        self._cancelled.discard(attempt_id)
        self._wake.set()

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Run attempts until none is due or running here (for tests and `kubeci run`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            await self.claim_and_start(self.concurrency)
            if not self.inflight:
                return
            await asyncio.wait(list(self.inflight.values()), return_when=asyncio.FIRST_COMPLETED)
        raise TimeoutError(f"attempts still running after {timeout_s} s")

    # ---- running one attempt ------------------------------------------------------------

    async def _run_attempt(self, attempt_id: int, recovered: bool) -> None:
        extra = {"attempt_id": attempt_id, **self.log_extra}
        try:
            result = await self._execute(attempt_id, recovered)
        except asyncio.CancelledError:
            if attempt_id not in self._cancelled:
                raise  # shutting down: stop() hands the lease back
            result = AttemptResult.failure("cancelled")
            await self._complete(attempt_id, result, cancelled=True)
            return
        except DB_ERRORS as exc:
            # The lease runs out and another worker (or this one) runs the attempt again.
            log.warning("loading the attempt failed: %s", exc, extra=extra)
            return
        if result.outcome == "parked":
            await self._park(attempt_id, result)
            return
        log.info("attempt %s: %s", result.outcome, result.message, extra=extra)
        await self._complete(attempt_id, result)

    async def _clean_up_cancelled(self, attempt_id: int) -> None:
        """End an attempt whose task was cancelled while no process ran it.

        The attempt was recovered from a dead process's lease. The action's `cancel`
        removes what that process left behind, such as a Kubernetes Job, and the attempt
        is not run again.
        """
        extra = {"attempt_id": attempt_id, **self.log_extra}
        try:
            row = await self._load(attempt_id, recovered=True)
            action = self.actions.get(row["action"])
            if action is not None:
                ctx = await self._context(row, action)
                async with asyncio.timeout(CANCEL_CLEAN_UP_S):
                    await action.cancel(ctx)
        except (PlaceholderError, TimeoutError) as exc:
            log.warning("cleaning up a cancelled attempt failed: %s", exc, extra=extra)
        except DB_ERRORS as exc:
            log.warning("loading a cancelled attempt failed: %s", exc, extra=extra)
            return
        except Exception:  # a cleanup bug must not keep the attempt running forever
            log.exception("cleaning up a cancelled attempt raised", extra=extra)
        await self._complete(attempt_id, AttemptResult.failure("cancelled"), cancelled=True)

    async def _load(self, attempt_id: int, *, recovered: bool) -> AttemptRow:
        async with self.pool.acquire() as conn:
            record = await conn.fetchrow(CLAIMED_ATTEMPT_SQL, attempt_id)
        assert record is not None
        return AttemptRow(record=dict(record), recovered=recovered)

    async def _context(self, row: AttemptRow, action: Action) -> AttemptContext:
        uses_callback = action.uses_callback
        # An action may decide per task whether it needs a token (the webhook action
        # needs one only in async mode), which spares a committed INSERT per attempt.
        needs_callback = getattr(action, "needs_callback", None)
        if uses_callback and needs_callback is not None:
            uses_callback = bool(needs_callback(row["task_spec"].get("arguments", {})))
        return await build_context(
            self.pool,
            row,
            uses_callback=uses_callback,
            secrets=self.secrets,
            callback_base_url=self.engine.settings.callback_base_url,
            run_url=self.engine.run_url(row["run_id"]),
            owner=self.worker_id,
            extra=self.action_extra,
        )

    async def _execute(self, attempt_id: int, recovered: bool) -> AttemptResult:
        row = await self._load(attempt_id, recovered=recovered)
        action = self.actions.get(row["action"])
        if action is None:
            return AttemptResult.failure(
                f"no runner for action {row['action']!r} on this server", retryable=False
            )
        if row["deadline_at"] <= row["db_now"]:
            return AttemptResult.failure(f"timed out after {row['timeout_s']:g} s")
        try:
            ctx = await self._context(row, action)
        except PlaceholderError as exc:
            return AttemptResult.failure(str(exc), retryable=False)
        self._contexts[attempt_id] = ctx
        try:
            async with asyncio.timeout(ctx.remaining_s):
                return await action.execute(ctx)
        except TimeoutError:
            return AttemptResult.failure(f"timed out after {row['timeout_s']:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an action bug must fail the attempt, not the worker
            log.exception("action %s raised", row["action"], extra={"attempt_id": attempt_id})
            return AttemptResult.failure(
                self.secrets.mask(f"internal error in action {row['action']}: {exc!r}")
            )

    async def _complete(
        self, attempt_id: int, result: AttemptResult, *, cancelled: bool = False
    ) -> None:
        for delay_s in (0.0, 0.5, 2.0, 5.0):
            await asyncio.sleep(delay_s)
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    await self.engine.complete_attempt(
                        conn, attempt_id, result, owner=self.worker_id, cancelled=cancelled
                    )
                return
            except DB_ERRORS as exc:
                log.warning(
                    "recording the outcome failed, retrying: %s",
                    exc,
                    extra={"attempt_id": attempt_id, **self.log_extra},
                )
        # The lease runs out; another worker re-runs the attempt with recovered=True.
        log.error("could not record the outcome", extra={"attempt_id": attempt_id})

    async def _park(self, attempt_id: int, result: AttemptResult) -> None:
        result = storable(result)
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE attempts SET state = 'waiting', lease_owner = NULL,"
                " lease_expires_at = NULL, message = $3, response_status = $4,"
                " response_excerpt = $5 WHERE id = $1 AND state = 'running' AND lease_owner = $2",
                attempt_id,
                self.worker_id,
                result.message,
                result.response_status,
                result.response_excerpt,
            )

    # ---- heartbeat and deadlines --------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        try:
            await self.heartbeat()
        except DB_ERRORS as exc:
            log.warning("heartbeat failed: %s", exc, extra=self.log_extra)

    async def heartbeat(self) -> None:
        """Renew the leases of running attempts; stop those cancelled or lost."""
        ids = [aid for aid in self.inflight if aid not in self._cancelled]
        if not ids:
            return
        async with self.pool.acquire() as conn:
            renewed = await conn.fetch(HEARTBEAT_SQL, self.worker_id, ids, self.lease)
        still_ours = {row["id"]: row["cancel_requested"] for row in renewed}
        for attempt_id in ids:
            if still_ours.get(attempt_id, True):
                # Cancelled, completed by a callback, or no longer leased to us.
                self._cancelled.add(attempt_id)
                task = self.inflight.get(attempt_id)
                if task is not None:
                    task.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.sweep()
            except DB_ERRORS as exc:
                log.warning("deadline sweep failed: %s", exc, extra=self.log_extra)

    async def sweep(self) -> int:
        """Fail overdue jobs and parked attempts whose deadline passed; return how many."""
        async with self.pool.acquire() as conn:
            jobs = await conn.fetch(
                "SELECT id FROM jobs WHERE state = 'running' AND deadline_at <= now() LIMIT 100"
            )
            parked = await conn.fetch(
                "SELECT a.id, t.timeout_s FROM attempts a JOIN tasks t ON t.id = a.task_id"
                " WHERE a.state = 'waiting' AND a.deadline_at <= now() LIMIT 100"
            )
        count = 0
        for job in jobs:
            async with self.pool.acquire() as conn, conn.transaction():
                count += await self.engine.expire_job(conn, job["id"])
        for attempt in parked:
            result = AttemptResult.failure(
                f"timed out after {attempt['timeout_s']:g} s waiting for the callback"
            )
            async with self.pool.acquire() as conn, conn.transaction():
                count += await self.engine.complete_attempt(conn, attempt["id"], result)
        return count
