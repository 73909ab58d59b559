"""Outbox rows for the notifiers subscribed to an event.

Placeholders in a notifier (including secrets) are filled when the row is sent, not
here, so no secret value is ever stored in the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.engine.events import Event, RunInfo
from bot.store.db import Connection, notify


async def enqueue_notifiers(
    conn: Connection,
    notifiers: Sequence[dict[str, Any]],
    event: Event,
    run: RunInfo,
) -> int:
    """Insert one outbox row per notifier subscribed to `event`; return how many."""
    count = 0
    for notifier in notifiers:
        if event.name not in notifier.get("events", ()):
            continue
        payload = {
            "notifier": notifier,
            "event": event.as_payload(),
            "labels": run.labels,
            "run": {"id": run.id, "url": run.url},
            "trusted": run.trusted,
        }
        await conn.execute(
            "INSERT INTO outbox (kind, ordering_key, sink_key, payload, run_id)"
            " VALUES ($1, $2, $3, $4, $5)",
            f"notifier.{notifier['type']}",
            f"notifier:{run.id}:{notifier['name']}",
            f"notifier:{run.id}:{event.id}:{notifier['name']}",
            payload,
            run.id,
        )
        count += 1
    if count:
        await notify(conn, "outbox")
    return count
