"""Outbox rows for notifiers, built by the engine in the transaction that emits an event."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

from bot.net.sinks import OutboxInsert
from pipelines_schema.models import Notifier


class NotifierEvent(TypedDict):
    """An event as notifiers see it; `id` is the row id in the `events` table."""

    id: int
    scope: Literal["job", "step", "task"]
    name: str
    run_id: int
    job: str
    step: str | None
    task: str | None
    state: str
    message: str
    attempt: int | None
    at: str  # ISO 8601


class RunRef(TypedDict):
    id: int
    url: str


class NotifierPayload(TypedDict):
    """The `payload` of a notifier outbox row; templates are still unrendered."""

    notifier: dict[str, Any]
    event: NotifierEvent
    labels: dict[str, Any]
    run: RunRef
    trusted: bool


def notifier_rows(
    notifiers: Iterable[Notifier],
    event: NotifierEvent,
    labels: Mapping[str, Any],
    run: RunRef,
    trusted: bool,
) -> list[OutboxInsert]:
    """Return one outbox row per notifier subscribed to `event["name"]`.

    The rows hold the notifier's templates as written: placeholders, secrets included,
    are filled only when the row is sent, so no secret is stored in the database.
    """
    rows = []
    for notifier in notifiers:
        if event["name"] not in notifier.events:
            continue
        payload: NotifierPayload = {
            "notifier": _notifier_dict(notifier),
            "event": event,
            "labels": dict(labels),
            "run": run,
            "trusted": trusted,
        }
        rows.append(
            OutboxInsert(
                kind=f"notifier.{notifier.type}",
                ordering_key=f"notifier:{run['id']}:{notifier.name}",
                sink_key=f"notifier:{run['id']}:{event['id']}:{notifier.name}",
                payload=dict(payload),
                run_id=run["id"],
            )
        )
    return rows


def _notifier_dict(notifier: Notifier) -> dict[str, Any]:
    data = dataclasses.asdict(notifier)
    data["events"] = list(notifier.events)
    return data
