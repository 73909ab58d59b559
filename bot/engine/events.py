"""Events: rows in the `events` table, handed to notifiers and to event hooks.

An event is emitted inside the transaction that makes the state change it reports, so
a state change and its events (and the outbox rows they cause) commit together.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from bot.store.db import Connection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """The run an event belongs to, as reporters and notifiers need it."""

    id: int
    url: str
    forge: str
    repository: str
    sha: str
    ref: str
    pr_number: int | None
    trusted: bool
    labels: dict[str, Any]
    source: dict[str, Any]

    @classmethod
    def from_row(cls, row: asyncpg.Record | dict[str, Any], url: str) -> RunInfo:
        return cls(
            id=row["id"],
            url=url,
            forge=row["forge"],
            repository=row["repository"],
            sha=row["sha"],
            ref=row["ref"],
            pr_number=row["pr_number"],
            trusted=row["trusted"],
            labels=dict(row["labels"]),
            source=dict(row["source"]),
        )


@dataclass(frozen=True)
class Event:
    id: int
    scope: str  # run, job, step, task
    name: str
    run_id: int
    at: datetime
    job_id: int | None = None
    step_id: int | None = None
    task_id: int | None = None
    job: str | None = None
    step: str | None = None
    task: str | None = None
    state: str = ""
    message: str = ""
    attempt: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_payload(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": self.name,
            "run_id": self.run_id,
            "job": self.job,
            "step": self.step,
            "task": self.task,
            "state": self.state,
            "message": self.message,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
            **self.extra,
        }


# A hook runs inside the emitting transaction; it may insert outbox rows on `conn`.
EventHook = Callable[[Connection, Event, RunInfo], Awaitable[None]]


@dataclass(frozen=True)
class Scope:
    """Location of an event: ids and names of its run, job, step and task."""

    run: RunInfo
    job_id: int | None = None
    job: str | None = None
    step_id: int | None = None
    step: str | None = None
    task_id: int | None = None
    task: str | None = None

    @property
    def level(self) -> str:
        if self.task_id is not None:
            return "task"
        if self.step_id is not None:
            return "step"
        if self.job_id is not None:
            return "job"
        return "run"


async def insert_event(
    conn: Connection,
    scope: Scope,
    name: str,
    *,
    state: str = "",
    message: str = "",
    attempt: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Event:
    row = await conn.fetchrow(
        "INSERT INTO events (run_id, job_id, step_id, task_id, scope, name, payload)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id, created_at",
        scope.run.id,
        scope.job_id,
        scope.step_id,
        scope.task_id,
        scope.level,
        name,
        {"state": state, "message": message, "attempt": attempt, **(extra or {})},
    )
    assert row is not None
    return Event(
        id=row["id"],
        scope=scope.level,
        name=name,
        run_id=scope.run.id,
        at=row["created_at"],
        job_id=scope.job_id,
        step_id=scope.step_id,
        task_id=scope.task_id,
        job=scope.job,
        step=scope.step,
        task=scope.task,
        state=state,
        message=message,
        attempt=attempt,
        extra=extra or {},
    )


async def run_hooks(
    conn: Connection, hooks: Sequence[EventHook], event: Event, run: RunInfo
) -> None:
    for hook in hooks:
        await hook(conn, event, run)
