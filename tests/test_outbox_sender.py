"""The outbox sender against real Postgres, with a scripted sink."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from bot.outbox import (
    OutboxRow,
    OutboxSender,
    RetryPolicy,
    SinkOutcome,
    SinkState,
    enqueue,
    payload_hash,
)

KIND = "test.sink"
FAST_RETRY = RetryPolicy(max_attempts=4, initial_s=0.0, factor=2.0, max_s=0.0)


class ScriptedSink:
    """Returns scripted outcomes in order (the last repeats) and records each call."""

    def __init__(self, *outcomes: SinkOutcome | Exception) -> None:
        self.outcomes = list(outcomes) or [SinkOutcome.sent()]
        self.calls: list[tuple[OutboxRow, SinkState | None]] = []
        self.on_send: Callable[[OutboxRow], Awaitable[None]] | None = None
        self.called = asyncio.Event()

    async def send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        self.calls.append((row, state))
        self.called.set()
        if self.on_send is not None:
            await self.on_send(row)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @property
    def sent_ids(self) -> list[int]:
        return [row.id for row, _ in self.calls]


def make_sender(
    pool: asyncpg.Pool, sink: ScriptedSink, worker_id: str = "w1", **kwargs: object
) -> OutboxSender:
    options: dict[str, object] = {"retry": FAST_RETRY, **kwargs}
    return OutboxSender(pool, {KIND: sink}, worker_id, **options)  # type: ignore[arg-type]


async def add(
    pool: asyncpg.Pool,
    ordering_key: str = "k",
    sink_key: str = "s",
    payload: dict[str, Any] | None = None,
) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(
            conn,
            kind=KIND,
            ordering_key=ordering_key,
            sink_key=sink_key,
            payload=payload if payload is not None else {"n": 1},
            run_id=5,
        )


async def row(pool: asyncpg.Pool, row_id: int) -> asyncpg.Record:
    async with pool.acquire() as conn:
        record = await conn.fetchrow(
            "SELECT *, extract(epoch FROM next_attempt_at - now())::float8 AS due_in_s"
            " FROM outbox WHERE id = $1",
            row_id,
        )
    assert record is not None
    return record


async def test_send_marks_row_sent(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.sent())
    count = await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert count == 1
    assert record["state"] == "sent"
    assert record["attempts"] == 1
    assert record["sent_at"] is not None
    assert record["lease_owner"] is None


async def test_ordering_key_oldest_first(db: asyncpg.Pool) -> None:
    first = await add(db, ordering_key="a", sink_key="a1", payload={"n": 1})
    second = await add(db, ordering_key="a", sink_key="a2", payload={"n": 2})
    other = await add(db, ordering_key="b", sink_key="b1", payload={"n": 3})
    sink = ScriptedSink(SinkOutcome.sent())
    count = await make_sender(db, sink).drain_once()
    assert count == 3
    assert sorted(sink.sent_ids) == [first, second, other]
    assert sink.sent_ids.index(second) > sink.sent_ids.index(first)


async def test_ordering_key_waits_for_retry(db: asyncpg.Pool) -> None:
    first = await add(db, ordering_key="a", sink_key="a1", payload={"n": 1})
    second = await add(db, ordering_key="a", sink_key="a2", payload={"n": 2})
    sink = ScriptedSink(SinkOutcome.retry("down", retry_after_s=60))
    await make_sender(db, sink).drain_once()
    assert sink.sent_ids == [first]
    assert (await row(db, second))["attempts"] == 0


async def test_dead_row_unblocks_ordering_key(db: asyncpg.Pool) -> None:
    first = await add(db, ordering_key="a", sink_key="a1", payload={"n": 1})
    second = await add(db, ordering_key="a", sink_key="a2", payload={"n": 2})
    sink = ScriptedSink(SinkOutcome.dead("HTTP 404"), SinkOutcome.sent())
    await make_sender(db, sink).drain_once()
    assert sink.sent_ids == [first, second]
    assert (await row(db, first))["state"] == "dead"
    assert (await row(db, second))["state"] == "sent"


async def test_retry_then_success(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 503"), SinkOutcome.sent())
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "sent"
    assert record["attempts"] == 2
    assert record["last_error"] == ""


async def test_retry_after_sets_next_attempt(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 429", retry_after_s=120))
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "pending"
    assert record["last_error"] == "HTTP 429"
    assert 115 < record["due_in_s"] <= 120
    assert record["lease_owner"] is None


async def test_retry_after_capped(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 429", retry_after_s=86_400))
    retry = RetryPolicy(initial_s=0.0, max_s=0.0, max_retry_after_s=600)
    await make_sender(db, sink, retry=retry).drain_once()
    assert (await row(db, row_id))["due_in_s"] <= 600


async def test_backoff_grows_without_retry_after(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 503"))
    retry = RetryPolicy(initial_s=100.0, factor=2.0, max_s=1000.0)
    await make_sender(db, sink, retry=retry).drain_once()
    # Equal jitter: between half the base delay and the whole of it.
    assert 45 < (await row(db, row_id))["due_in_s"] <= 100


async def test_dead_after_max_attempts(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 503"))
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert len(sink.calls) == FAST_RETRY.max_attempts
    assert record["state"] == "dead"
    assert record["attempts"] == FAST_RETRY.max_attempts
    assert record["last_error"] == "gave up after 4 attempts: HTTP 503"


async def test_dead_outcome_is_final(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.dead("HTTP 400: invalid_payload"))
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert len(sink.calls) == 1
    assert record["state"] == "dead"
    assert record["last_error"] == "HTTP 400: invalid_payload"


async def test_sink_exception_retried_and_logged(
    db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    row_id = await add(db)
    sink = ScriptedSink(RuntimeError("boom"), SinkOutcome.sent())
    with caplog.at_level(logging.ERROR, logger="bot.outbox.sender"):
        await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "sent"
    assert record["attempts"] == 2
    assert "Traceback" in caplog.text
    assert "RuntimeError: boom" in caplog.text


async def test_sink_exception_message_masked(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(RuntimeError("token s3cret leaked"))
    sender = make_sender(
        db, sink, retry=RetryPolicy(max_attempts=1), mask=lambda t: t.replace("s3cret", "***")
    )
    await sender.drain_once()
    assert "s3cret" not in (await row(db, row_id))["last_error"]


async def test_nul_in_retry_error_stored(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.retry("HTTP 500: oops\x00\ud800", retry_after_s=60))
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "pending"
    assert record["lease_owner"] is None
    assert record["last_error"] == "HTTP 500: oops\ufffd\ufffd"


async def test_nul_in_dead_error_stored(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    await make_sender(db, ScriptedSink(SinkOutcome.dead("HTTP 400: \x00"))).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "dead"
    assert record["last_error"] == "HTTP 400: \ufffd"


async def test_nul_in_payload_stored(db: asyncpg.Pool) -> None:
    row_id = await add(db, payload={"message": "bad\x00byte", "list": ["\x00"], "k\x00": 1})
    record = await row(db, row_id)
    payload = record["payload"]
    assert payload == {"message": "bad\ufffdbyte", "list": ["\ufffd"], "k\ufffd": 1}


async def test_sink_timeout_retried(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.sent())

    async def hang(_row: OutboxRow) -> None:
        await asyncio.sleep(10)

    sink.on_send = hang
    sender = make_sender(db, sink, retry=RetryPolicy(max_attempts=1), send_timeout_s=0.1)
    await sender.drain_once()
    record = await row(db, row_id)
    assert record["state"] == "dead"
    assert "did not finish within 0.1 s" in record["last_error"]


async def test_same_payload_skipped_after_restart(db: asyncpg.Pool) -> None:
    await add(db, sink_key="status:build", payload={"state": "success"})
    first_sink = ScriptedSink(SinkOutcome.sent(remote_id="r-1"))
    await make_sender(db, first_sink, worker_id="before-restart").drain_once()

    repeat = await add(db, sink_key="status:build", payload={"state": "success"})
    second_sink = ScriptedSink(SinkOutcome.sent())
    await make_sender(db, second_sink, worker_id="after-restart").drain_once()
    assert second_sink.calls == []
    assert (await row(db, repeat))["state"] == "skipped"


async def test_changed_payload_sent_with_state(db: asyncpg.Pool) -> None:
    await add(db, sink_key="status:build", payload={"state": "pending"})
    await make_sender(db, ScriptedSink(SinkOutcome.sent(remote_id="r-1"))).drain_once()

    changed = await add(db, sink_key="status:build", payload={"state": "success"})
    sink = ScriptedSink(SinkOutcome.sent())
    await make_sender(db, sink, worker_id="w2").drain_once()
    _, state = sink.calls[0]
    assert (await row(db, changed))["state"] == "sent"
    assert state is not None
    assert state.payload_hash == payload_hash({"state": "pending"})
    assert state.remote_id == "r-1"


async def test_sink_state_keeps_remote_id(db: asyncpg.Pool) -> None:
    await add(db, sink_key="comment:1", payload={"body": "a"})
    await make_sender(db, ScriptedSink(SinkOutcome.sent(remote_id="c-9"))).drain_once()
    await add(db, sink_key="comment:1", payload={"body": "b"})
    await make_sender(db, ScriptedSink(SinkOutcome.sent())).drain_once()
    async with db.acquire() as conn:
        state = await conn.fetchrow("SELECT * FROM sink_state WHERE sink_key = 'comment:1'")
    assert state is not None
    assert state["remote_id"] == "c-9"
    assert state["payload_hash"] == payload_hash({"body": "b"})


async def test_expired_lease_recovered(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE outbox SET lease_owner = 'crashed', attempts = 1,"
            " lease_expires_at = now() - interval '1 second' WHERE id = $1",
            row_id,
        )
    sink = ScriptedSink(SinkOutcome.sent())
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert sink.sent_ids == [row_id]
    assert record["state"] == "sent"
    assert record["attempts"] == 2


async def test_live_lease_not_taken(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    async with db.acquire() as conn:
        await conn.execute(
            "UPDATE outbox SET lease_owner = 'busy',"
            " lease_expires_at = now() + interval '1 minute' WHERE id = $1",
            row_id,
        )
    sink = ScriptedSink(SinkOutcome.sent())
    count = await make_sender(db, sink).drain_once()
    assert count == 0
    assert sink.calls == []


async def test_lost_lease_outcome_not_stored(db: asyncpg.Pool) -> None:
    row_id = await add(db)
    sink = ScriptedSink(SinkOutcome.sent())

    async def take_over(claimed: OutboxRow) -> None:
        async with db.acquire() as conn:
            await conn.execute("UPDATE outbox SET lease_owner = 'other' WHERE id = $1", claimed.id)

    sink.on_send = take_over
    await make_sender(db, sink).drain_once()
    record = await row(db, row_id)
    assert record["state"] == "pending"
    assert record["lease_owner"] == "other"


async def test_unknown_kind_left_pending(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        row_id = await enqueue(
            conn, kind="other.kind", ordering_key="x", sink_key="x", payload={"n": 1}
        )
    count = await make_sender(db, ScriptedSink()).drain_once()
    assert count == 0
    assert (await row(db, row_id))["state"] == "pending"


async def test_send_timeout_must_be_below_lease(db: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        make_sender(db, ScriptedSink(), lease_s=10.0, send_timeout_s=10.0)


async def test_run_wakes_on_notify(db: asyncpg.Pool) -> None:
    sink = ScriptedSink(SinkOutcome.sent())
    sender = make_sender(db, sink, poll_interval_s=60.0)
    task = asyncio.create_task(sender.run())
    try:
        # Let run() LISTEN and go idle with nothing to send.
        await asyncio.sleep(0.2)
        row_id = await add(db)
        await asyncio.wait_for(sink.called.wait(), 5)
    finally:
        sender.stop()
        await asyncio.wait_for(task, 5)
    assert sink.sent_ids == [row_id]
    assert (await row(db, row_id))["state"] == "sent"


async def test_run_keeps_going_after_sink_errors(db: asyncpg.Pool) -> None:
    sink = ScriptedSink(RuntimeError("boom"), SinkOutcome.sent())
    sender = make_sender(db, sink, poll_interval_s=0.05)
    row_id = await add(db)
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(5):
            while len(sink.calls) < 2:
                await asyncio.wait_for(sink.called.wait(), 5)
                sink.called.clear()
    finally:
        sender.stop()
        await asyncio.wait_for(task, 5)
    assert len(sink.calls) == 2
    assert (await row(db, row_id))["state"] == "sent"
