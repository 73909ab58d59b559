"""The contract between the outbox sender and the sinks it delivers to.

An outbox row contains what to report. A sink (a notifier, a forge status reporter)
sends it and returns a `SinkOutcome`. The sender owns retries, backoff, dead rows and the
record of what each sink last received. These types live here, below both the outbox
and the sinks, so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

OutcomeKind = Literal["sent", "skipped", "retry", "dead"]


def payload_hash(payload: Any) -> str:
    """Return the SHA-256 hex digest of `payload` as canonical JSON (sorted keys)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class OutboxInsert:
    """A row to add to the outbox, built inside the transaction that emits its event."""

    kind: str
    ordering_key: str
    sink_key: str
    payload: dict[str, Any]
    run_id: int | None = None


@dataclass(frozen=True)
class OutboxRow:
    """A claimed outbox row; `attempts` counts this attempt (1 for the first)."""

    id: int
    kind: str
    ordering_key: str
    sink_key: str
    payload: dict[str, Any]
    attempts: int
    run_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class SinkState:
    """The payload hash and remote id last sent for one `sink_key`."""

    sink_key: str
    payload_hash: str
    remote_id: str | None


@dataclass(frozen=True)
class SinkOutcome:
    kind: OutcomeKind
    message: str = ""
    # sent: the remote object's id (a comment id, a check run id) to keep for later edits.
    remote_id: str | None = None
    # sent: the hash to record; None records the hash of the row's payload.
    payload_hash: str | None = None
    # retry: the wait the remote side asked for (Retry-After, rate-limit reset), in seconds.
    retry_after_s: float | None = None

    @classmethod
    def sent(
        cls, message: str = "", *, remote_id: str | None = None, payload_hash: str | None = None
    ) -> SinkOutcome:
        return cls("sent", message, remote_id=remote_id, payload_hash=payload_hash)

    @classmethod
    def skipped(cls, message: str) -> SinkOutcome:
        return cls("skipped", message)

    @classmethod
    def retry(cls, message: str, *, retry_after_s: float | None = None) -> SinkOutcome:
        return cls("retry", message, retry_after_s=retry_after_s)

    @classmethod
    def dead(cls, message: str) -> SinkOutcome:
        return cls("dead", message)


class Sink(Protocol):
    async def send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        """Deliver one row. `state` is what this sink key last received, if anything.

        Return `retry` for failures another attempt may fix and `dead` for permanent
        ones. An exception counts as a retryable failure.
        """
        ...
