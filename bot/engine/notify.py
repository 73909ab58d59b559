"""Outbox rows for the notifiers subscribed to an event.

Placeholders in a notifier (including secrets) are filled when the row is sent, not
here, so no secret value is ever stored in the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.engine.events import Event, RunInfo
from bot.notifiers import notifier_rows
from bot.notifiers.rows import NotifierEvent
from bot.outbox.sender import enqueue_rows
from bot.store.db import Connection
from pipelines_schema.models import Notifier


def _notifier(data: dict[str, Any]) -> Notifier:
    return Notifier(**{**data, "events": tuple(data.get("events", ()))})


async def enqueue_notifiers(
    conn: Connection,
    notifiers: Sequence[dict[str, Any]],
    event: Event,
    run: RunInfo,
) -> int:
    """Insert one outbox row per notifier subscribed to `event`; return how many."""
    if event.scope == "run" or not any(event.name in n.get("events", ()) for n in notifiers):
        return 0
    payload: NotifierEvent = {
        "id": event.id,
        "scope": event.scope,  # type: ignore[typeddict-item]
        "name": event.name,
        "run_id": event.run_id,
        "job": event.job or "",
        "step": event.step,
        "task": event.task,
        "state": event.state,
        "message": event.message,
        "attempt": event.attempt,
        "at": event.at.isoformat(),
    }
    rows = notifier_rows(
        [_notifier(item) for item in notifiers],
        payload,
        run.labels,
        {"id": run.id, "url": run.url},
        run.trusted,
    )
    return len(await enqueue_rows(conn, rows))
