"""Reads of what a job did: its outcome, the task that failed it, and a tail of its log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bot.reporting.texts import tail
from bot.store.db import Connection

# Log rows considered from the end of an attempt's log.
_LOG_ROWS_MAX = 200


@dataclass(frozen=True)
class Excerpt:
    """Size limits of a log excerpt."""

    max_lines: int
    max_chars: int


@dataclass(frozen=True)
class FailedTask:
    step: str
    task: str
    message: str
    # The end of the last attempt's response and log; empty when nothing was stored.
    log_tail: str


@dataclass(frozen=True)
class JobOutcome:
    name: str
    state: str
    message: str
    superseded_by: str | None
    started_at: datetime | None
    finished_at: datetime | None
    # The first failed step, and the failed tasks (not allowed to fail), in pipeline order.
    failed_step: str | None
    failed_step_message: str
    failed_tasks: tuple[FailedTask, ...]


async def load_job_outcome(
    conn: Connection, job_id: int, excerpt: Excerpt, *, max_tasks: int = 5
) -> JobOutcome:
    """Read a job's outcome with the tails of up to `max_tasks` failed tasks' logs.

    Raises LookupError when the job does not exist.
    """
    job = await conn.fetchrow(
        "SELECT name, state, message, superseded_by, started_at, finished_at"
        " FROM jobs WHERE id = $1",
        job_id,
    )
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    step = await conn.fetchrow(
        "SELECT name, message FROM steps WHERE job_id = $1 AND state = 'failed'"
        " ORDER BY position LIMIT 1",
        job_id,
    )
    tasks = await conn.fetch(
        "SELECT t.id, t.name, t.message, s.name AS step FROM tasks t"
        " JOIN steps s ON s.id = t.step_id"
        " WHERE s.job_id = $1 AND t.state = 'failed' AND NOT t.allow_failure"
        " ORDER BY s.position, t.position LIMIT $2",
        job_id,
        max_tasks,
    )
    failed = [
        FailedTask(
            row["step"], row["name"], row["message"], await task_log_tail(conn, row["id"], excerpt)
        )
        for row in tasks
    ]
    return JobOutcome(
        name=job["name"],
        state=job["state"],
        message=job["message"],
        superseded_by=job["superseded_by"],
        started_at=job["started_at"],
        finished_at=job["finished_at"],
        failed_step=step["name"] if step else None,
        failed_step_message=step["message"] if step else "",
        failed_tasks=tuple(failed),
    )


async def task_log_tail(conn: Connection, task_id: int, excerpt: Excerpt) -> str:
    """Return the end of the last attempt's log and response body, within `excerpt`."""
    attempt = await conn.fetchrow(
        "SELECT id, response_status, response_excerpt FROM attempts WHERE task_id = $1"
        " ORDER BY number DESC LIMIT 1",
        task_id,
    )
    if attempt is None:
        return ""
    text = await _log_tail(conn, attempt["id"], excerpt.max_chars)
    if attempt["response_excerpt"]:
        response = f"response {attempt['response_status']}:\n{attempt['response_excerpt']}"
        text = f"{text.rstrip()}\n{response}" if text else response
    return tail(text, excerpt.max_lines, excerpt.max_chars) if text.strip() else ""


async def _log_tail(conn: Connection, attempt_id: int, max_chars: int) -> str:
    """Return at least the last `max_chars` characters of an attempt's log, when it has them.

    Only the newest rows whose sizes add up to `max_chars` are read, each cut to
    `max_chars`, so a long log costs a small read. Sizes come from `octet_length`,
    which PostgreSQL reads from the value's header without fetching or decompressing
    it (`textoctetlen` in varlena.c), and a byte count is never below a character count.
    """
    sizes = await conn.fetch(
        "SELECT id, octet_length(content) AS size_bytes FROM logs WHERE attempt_id = $1"
        " ORDER BY id DESC LIMIT $2",
        attempt_id,
        _LOG_ROWS_MAX,
    )
    total_bytes, oldest_id = 0, None
    for row in sizes:
        oldest_id = row["id"]
        total_bytes += row["size_bytes"]
        if total_bytes >= max_chars:
            break
    if oldest_id is None:
        return ""
    rows = await conn.fetch(
        "SELECT right(content, $3) AS content FROM logs WHERE attempt_id = $1 AND id >= $2"
        " ORDER BY id",
        attempt_id,
        oldest_id,
        max_chars,
    )
    return "".join(row["content"] for row in rows)
