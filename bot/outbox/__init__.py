"""The outbox: reports and notifications written with their event, delivered later."""

from bot.net.sinks import OutboxInsert, OutboxRow, Sink, SinkOutcome, SinkState, payload_hash
from bot.outbox.sender import OutboxSender, RetryPolicy, enqueue, enqueue_rows

__all__ = [
    "OutboxInsert",
    "OutboxRow",
    "OutboxSender",
    "RetryPolicy",
    "Sink",
    "SinkOutcome",
    "SinkState",
    "enqueue",
    "enqueue_rows",
    "payload_hash",
]
