"""The outbox sender: delivers outbox rows to their sinks, with retries.

Rows are written by `enqueue` inside the transaction that emits their event. The
sender claims due rows (`FOR UPDATE SKIP LOCKED`, with a lease that any process may
take over once it expires), sends each through the sink registered for its kind, and
records the outcome. Rows sharing an ordering key go one at a time, oldest first.

What each sink key last received is kept in `sink_state`, in the same transaction that
marks the row sent. A row whose payload matches that record is skipped, so a report is
not repeated. A crash between sending and that commit still sends the row again, because
delivery is at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from bot.net.http import backoff_delay_s
from bot.net.sinks import OutboxInsert, OutboxRow, Sink, SinkOutcome, SinkState, payload_hash
from bot.store.db import DB_ERRORS, WAKE_CHANNEL
from bot.store.text import clean_json, clean_text

log = logging.getLogger(__name__)

WAKE_TOPIC = "outbox"
# Errors of a lost or closing database connection (asyncpg timeouts are OSErrors).
_DB_ERRORS = DB_ERRORS

_CLAIM = """
WITH due AS (
    SELECT o.id FROM outbox o
    WHERE o.state = 'pending'
      AND o.next_attempt_at <= now()
      AND (o.lease_expires_at IS NULL OR o.lease_expires_at < now())
      AND o.kind = ANY($1::text[])
      AND (SELECT r.pinned_to FROM runs r WHERE r.id = o.run_id) IS NOT DISTINCT FROM $5
      AND NOT EXISTS (
          SELECT 1 FROM outbox older
          WHERE older.ordering_key = o.ordering_key AND older.state = 'pending'
            AND older.id < o.id
      )
    ORDER BY o.next_attempt_at, o.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox SET
    lease_owner = $3,
    lease_expires_at = now() + make_interval(secs => $4),
    attempts = outbox.attempts + 1
FROM due WHERE outbox.id = due.id
RETURNING outbox.id, outbox.kind, outbox.ordering_key, outbox.sink_key, outbox.payload,
          outbox.attempts, outbox.run_id, outbox.created_at
"""

_NEXT_DUE_S = """
SELECT EXTRACT(EPOCH FROM min(GREATEST(next_attempt_at, coalesce(lease_expires_at, now())))
                          - now())::float8
FROM outbox WHERE state = 'pending' AND kind = ANY($1::text[])
"""

# Every outcome update requires that this worker still holds the lease.
_FINISH = """
UPDATE outbox SET state = $3, last_error = $4, sent_at = CASE WHEN $3 = 'sent' THEN now() END,
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_owner = $2 AND state = 'pending'
"""

_RESCHEDULE = """
UPDATE outbox SET last_error = $3, next_attempt_at = now() + make_interval(secs => $4),
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_owner = $2 AND state = 'pending'
"""

_RECORD_SENT = """
INSERT INTO sink_state (sink_key, payload_hash, remote_id, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (sink_key) DO UPDATE SET
    payload_hash = EXCLUDED.payload_hash,
    remote_id = coalesce(EXCLUDED.remote_id, sink_state.remote_id),
    updated_at = now()
"""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a row is retried before it is marked dead."""

    max_attempts: int = 12
    initial_s: float = 5.0
    factor: float = 2.0
    max_s: float = 900.0
    # A longer Retry-After or rate-limit reset than this is cut to this.
    max_retry_after_s: float = 3600.0

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        backoff_s = backoff_delay_s(attempt, self.initial_s, self.factor, self.max_s)
        if retry_after_s is None:
            return backoff_s
        return max(backoff_s, min(retry_after_s, self.max_retry_after_s))


async def enqueue(
    conn: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record],
    *,
    kind: str,
    ordering_key: str,
    sink_key: str,
    payload: dict[str, Any],
    run_id: int | None = None,
) -> int:
    """Insert an outbox row and wake the senders when the transaction commits.

    Strings in `payload` are stored with NUL and lone surrogates replaced by U+FFFD,
    because Postgres jsonb rejects them.
    """
    row_id: int = await conn.fetchval(
        "INSERT INTO outbox (kind, ordering_key, sink_key, payload, run_id)"
        " VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING id",
        kind,
        ordering_key,
        sink_key,
        clean_json(payload),
        run_id,
    )
    # Same as bot.store.db.notify, which is typed for plain connections only.
    await conn.execute("SELECT pg_notify($1, $2)", WAKE_CHANNEL, WAKE_TOPIC)
    return row_id


async def enqueue_rows(
    conn: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record], rows: Iterable[OutboxInsert]
) -> list[int]:
    """Insert several outbox rows (see `enqueue`); return their ids in order."""
    ids = []
    for row in rows:
        ids.append(
            await enqueue(
                conn,
                kind=row.kind,
                ordering_key=row.ordering_key,
                sink_key=row.sink_key,
                payload=row.payload,
                run_id=row.run_id,
            )
        )
    return ids


def _row_from_record(record: asyncpg.Record) -> OutboxRow:
    payload = record["payload"]
    if isinstance(payload, str):
        payload = json.loads(payload)
    return OutboxRow(
        id=record["id"],
        kind=record["kind"],
        ordering_key=record["ordering_key"],
        sink_key=record["sink_key"],
        payload=payload,
        attempts=record["attempts"],
        run_id=record["run_id"],
        created_at=record["created_at"],
    )


def _no_mask(text: str) -> str:
    return text


class OutboxSender:
    """Claims due outbox rows and delivers them through the sink registered for their kind.

    Only kinds with a registered sink are claimed; rows of other kinds wait for a
    process that has one. `mask` hides secret values in stored errors and in logs.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        sinks: Mapping[str, Sink],
        worker_id: str,
        *,
        retry: RetryPolicy | None = None,
        lease_s: float = 120.0,
        send_timeout_s: float = 60.0,
        poll_interval_s: float = 2.0,
        batch_size: int = 20,
        mask: Callable[[str], str] = _no_mask,
        pinned_to: str | None = None,
    ) -> None:
        if send_timeout_s >= lease_s:
            raise ValueError(
                f"send_timeout_s={send_timeout_s} must be below lease_s={lease_s}, "
                "or another sender could take over a row that is still being sent"
            )
        self._pool = pool
        self._sinks = dict(sinks)
        self._kinds = sorted(self._sinks)
        self._worker_id = worker_id
        self._retry = retry or RetryPolicy()
        self._lease_s = lease_s
        self._send_timeout_s = send_timeout_s
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._mask = mask
        # None: send rows of unpinned runs (and rows of no run). A name: only rows of
        # runs pinned to it, as `kubeci run` does.
        self.pinned_to = pinned_to
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    async def drain_once(self) -> int:
        """Deliver every row that is due now, including rows unblocked on the way.

        Returns the number of delivery attempts made. Stops early after `stop()`.
        """
        count = 0
        while not self._stopping.is_set():
            rows = await self._claim()
            if not rows:
                return count
            await asyncio.gather(*(self._deliver_logged(row) for row in rows))
            count += len(rows)
        return count

    async def run(self) -> None:
        """Deliver rows until `stop()` is called; wake on NOTIFY, else poll."""
        log.info("outbox sender started", extra={"worker_id": self._worker_id})
        listener = None
        try:
            listener = await self._listen()
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    await self.drain_once()
                except _DB_ERRORS:
                    log.exception(
                        "outbox sender could not reach the database; retrying",
                        extra={"worker_id": self._worker_id},
                    )
                await self._sleep()
        finally:
            await self._unlisten(listener)
            log.info("outbox sender stopped", extra={"worker_id": self._worker_id})

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _claim(self) -> list[OutboxRow]:
        async with self._pool.acquire() as conn:
            records = await conn.fetch(
                _CLAIM,
                self._kinds,
                self._batch_size,
                self._worker_id,
                self._lease_s,
                self.pinned_to,
            )
        return sorted((_row_from_record(record) for record in records), key=lambda row: row.id)

    async def _deliver_logged(self, row: OutboxRow) -> None:
        try:
            await self._deliver(row)
        except Exception:
            # The lease expires and another attempt takes the row.
            log.exception(
                "outbox delivery could not be recorded",
                extra={"outbox_id": row.id, "run_id": row.run_id, "worker_id": self._worker_id},
            )

    async def _deliver(self, row: OutboxRow) -> None:
        row_hash = payload_hash(row.payload)
        state = await self._sink_state(row.sink_key)
        if state is not None and state.payload_hash == row_hash:
            outcome = SinkOutcome.skipped("the same payload was already sent")
        else:
            outcome = await self._send(row, state)
        await self._record(row, outcome, row_hash)

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        sink = self._sinks[row.kind]
        try:
            async with asyncio.timeout(self._send_timeout_s):
                return await sink.send(row, state)
        except TimeoutError:
            return SinkOutcome.retry(f"the sink did not finish within {self._send_timeout_s:g} s")
        except Exception as exc:
            details = self._mask("".join(traceback.format_exception(exc)))
            log.error(
                "outbox sink %s raised an unexpected error:\n%s",
                row.kind,
                details,
                extra={"outbox_id": row.id, "run_id": row.run_id, "worker_id": self._worker_id},
            )
            return SinkOutcome.retry(f"unexpected error: {type(exc).__name__}: {exc}")

    async def _sink_state(self, sink_key: str) -> SinkState | None:
        async with self._pool.acquire() as conn:
            record = await conn.fetchrow(
                "SELECT sink_key, payload_hash, remote_id FROM sink_state WHERE sink_key = $1",
                sink_key,
            )
        if record is None:
            return None
        return SinkState(record["sink_key"], record["payload_hash"], record["remote_id"])

    async def _record(self, row: OutboxRow, outcome: SinkOutcome, row_hash: str) -> None:
        # Postgres text rejects NUL, which an error body may contain.
        message = clean_text(self._mask(outcome.message))
        if outcome.kind == "retry" and row.attempts >= self._retry.max_attempts:
            outcome = SinkOutcome.dead(f"gave up after {row.attempts} attempts: {message}")
            message = outcome.message
        async with self._pool.acquire() as conn, conn.transaction():
            if outcome.kind == "retry":
                delay_s = self._retry.delay_s(row.attempts, outcome.retry_after_s)
                status = await conn.execute(_RESCHEDULE, row.id, self._worker_id, message, delay_s)
            else:
                error = message if outcome.kind == "dead" else ""
                status = await conn.execute(_FINISH, row.id, self._worker_id, outcome.kind, error)
                if outcome.kind == "sent" and status == "UPDATE 1":
                    recorded_hash = outcome.payload_hash or row_hash
                    await conn.execute(_RECORD_SENT, row.sink_key, recorded_hash, outcome.remote_id)
        self._log_outcome(row, outcome, message, lease_held=status == "UPDATE 1")

    def _log_outcome(
        self, row: OutboxRow, outcome: SinkOutcome, message: str, *, lease_held: bool
    ) -> None:
        extra = {"outbox_id": row.id, "run_id": row.run_id, "worker_id": self._worker_id}
        attempt = f"attempt {row.attempts}/{self._retry.max_attempts}"
        if not lease_held:
            log.warning(
                "outbox %s %s: %s, but the lease passed to another sender; outcome not stored",
                row.kind,
                attempt,
                outcome.kind,
                extra=extra,
            )
            return
        level = logging.WARNING if outcome.kind in ("retry", "dead") else logging.INFO
        log.log(level, "outbox %s %s: %s %s", row.kind, attempt, outcome.kind, message, extra=extra)

    async def _sleep(self) -> None:
        timeout_s = self._poll_interval_s
        try:
            async with self._pool.acquire() as conn:
                next_due_s = await conn.fetchval(_NEXT_DUE_S, self._kinds)
        except _DB_ERRORS:
            next_due_s = None
        if next_due_s is not None:
            timeout_s = min(timeout_s, max(0.01, next_due_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    async def _listen(self) -> PoolConnectionProxy[asyncpg.Record] | None:
        try:
            conn = await self._pool.acquire()
        except _DB_ERRORS:
            log.warning("cannot LISTEN for new outbox rows; polling only", exc_info=True)
            return None
        try:
            await conn.add_listener(WAKE_CHANNEL, self._on_notify)
        except BaseException as exc:
            # Cancellation included: the connection must go back to the pool.
            await self._pool.release(conn)
            if not isinstance(exc, _DB_ERRORS):
                raise
            log.warning("cannot LISTEN for new outbox rows; polling only", exc_info=True)
            return None
        return conn

    async def _unlisten(self, conn: PoolConnectionProxy[asyncpg.Record] | None) -> None:
        if conn is None:
            return
        try:
            await conn.remove_listener(WAKE_CHANNEL, self._on_notify)
        except _DB_ERRORS:
            log.warning("could not UNLISTEN; releasing the connection anyway", exc_info=True)
        finally:
            await self._pool.release(conn)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == WAKE_TOPIC:
            self._wake.set()
