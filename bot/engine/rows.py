"""Row access for the engine: reads and locks of runs, jobs, steps, tasks and attempts."""

from __future__ import annotations

from typing import Any

import asyncpg

from bot.store.db import Connection
from pipelines_schema.models import Job, from_dict

ACTIVE_STATES = ("pending", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "skipped")


async def lock_job(conn: Connection, job_id: int, *, nowait: bool = False) -> asyncpg.Record:
    """Lock a job row; decisions about the job and its steps are serialised on this lock.

    The lock is FOR NO KEY UPDATE, so that completions that do not hold it can still
    insert events, whose foreign key to the job takes FOR KEY SHARE. With `nowait`,
    raises asyncpg.LockNotAvailableError instead of waiting.
    """
    sql = "SELECT * FROM jobs WHERE id = $1 FOR NO KEY UPDATE" + (" NOWAIT" if nowait else "")
    row = await conn.fetchrow(sql, job_id)
    if row is None:
        raise LookupError(f"job {job_id} does not exist")
    return row


# Every column of `runs` but `pipeline`: that document grows with the pipeline, and
# decoding it on each state change made a run's cost grow with the square of its tasks.
RUN_COLUMNS = (
    "id, created_at, started_at, finished_at, state, forge, repository, sha, ref, pr_number,"
    " trusted, labels, source, delivery_pk, message"
)


async def fetch_run(conn: Connection, run_id: int, *, lock: bool = False) -> asyncpg.Record:
    """Return the run's row without its pipeline document (see `fetch_job_model`).

    `lock` takes FOR NO KEY UPDATE: it serialises the run's outcome, but unlike FOR UPDATE
    it does not wait for the FOR KEY SHARE locks that inserting an event (a foreign key
    to the run) takes. With FOR UPDATE, two jobs of one run that ended at once deadlocked:
    each held the key-share lock of its events and waited for the other's.
    """
    sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1" + (" FOR NO KEY UPDATE" if lock else "")
    row = await conn.fetchrow(sql, run_id)
    if row is None:
        raise LookupError(f"run {run_id} does not exist")
    return row


async def fetch_job_model(conn: Connection, run_id: int, position: int) -> Job:
    """The job at `position` of the run's stored pipeline, read without the other jobs."""
    data = await conn.fetchval(
        "SELECT pipeline->'jobs'->$2::int FROM runs WHERE id = $1", run_id, position
    )
    if data is None:
        raise LookupError(f"run {run_id} has no job at position {position}")
    return from_dict({"jobs": [data]}).jobs[0]


async def fetch_step(conn: Connection, step_id: int) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM steps WHERE id = $1", step_id)
    if row is None:
        raise LookupError(f"step {step_id} does not exist")
    return row


async def fetch_step_at(conn: Connection, job_id: int, position: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM steps WHERE job_id = $1 AND position = $2", job_id, position
    )


async def lock_task(conn: Connection, task_id: int) -> asyncpg.Record:
    """Lock a task row (FOR NO KEY UPDATE) and return it.

    Lock order: the job (when taken), then the task, then its attempts.
    """
    row = await conn.fetchrow("SELECT * FROM tasks WHERE id = $1 FOR NO KEY UPDATE", task_id)
    if row is None:
        raise LookupError(f"task {task_id} does not exist")
    return row


async def cancel_task_row(conn: Connection, task_id: int, message: str) -> bool:
    """Set an active task's state to cancelled; return False when it had already ended.

    A completion that does not hold the job's lock may end the task first; the state
    check runs again on the row that completion committed.
    """
    done = await conn.fetchval(
        "UPDATE tasks SET state = 'cancelled', finished_at = coalesce(finished_at, now()),"
        " message = $2 WHERE id = $1 AND state IN ('pending', 'running') RETURNING id",
        task_id,
        message,
    )
    return done is not None


# A step's counter is split into shards of about TASKS_PER_SHARD tasks, at most
# MAX_SHARDS, so concurrent completions of a large step do not all queue on one row lock.
# A small step keeps one shard, so only its last completion locks the job.
TASKS_PER_SHARD = 8
MAX_SHARDS = 16


def counter_shards(started: int) -> int:
    """Return how many counter shards a step with `started` tasks gets."""
    return max(1, min(MAX_SHARDS, started // TASKS_PER_SHARD))


async def start_step_counters(conn: Connection, step_id: int, started: int, shards: int) -> None:
    """Store the step's counters: task number i of `started` counts on shard i % shards."""
    counts = [started // shards + (1 if shard < started % shards else 0) for shard in range(shards)]
    await conn.executemany(
        "INSERT INTO step_counters (step_id, shard, unfinished) VALUES ($1, $2, $3)"
        " ON CONFLICT (step_id, shard) DO UPDATE SET unfinished = EXCLUDED.unfinished",
        [(step_id, shard, count) for shard, count in enumerate(counts)],
    )


async def end_counted_task(conn: Connection, step_id: int, shard: int | None) -> int | None:
    """Count one of the step's tasks as ended; return what its shard still waits for.

    Returns None for a task without a shard (started before step counters existed).
    The shard's row lock is held until commit, so the completion that reads 0 runs after
    every other task of its shard has committed.
    """
    if shard is None:
        return None
    remaining = await conn.fetchval(
        "UPDATE step_counters SET unfinished = unfinished - 1"
        " WHERE step_id = $1 AND shard = $2 RETURNING unfinished",
        step_id,
        shard,
    )
    return None if remaining is None else int(remaining)


async def fetch_step_tasks(conn: Connection, step_id: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch("SELECT * FROM tasks WHERE step_id = $1 ORDER BY position", step_id)
    )


async def fetch_step_outcomes(conn: Connection, step_id: int) -> list[asyncpg.Record]:
    """Name, state, detached and allow_failure of a step's tasks: what decides the step.

    Runs on every task's end, so it leaves out `spec`, whose decoding would cost as much
    as the step has tasks.
    """
    return list(
        await conn.fetch(
            "SELECT name, state, detached, allow_failure FROM tasks WHERE step_id = $1"
            " ORDER BY position",
            step_id,
        )
    )


async def attempt_owner_ids(conn: Connection, attempt_id: int) -> asyncpg.Record | None:
    """Return the task, step, job and run ids of an attempt, the step's and job's names,
    and the run's columns of RUN_COLUMNS (no lock)."""
    run_columns = ", ".join(f"r.{name.strip()}" for name in RUN_COLUMNS.split(","))
    return await conn.fetchrow(
        f"SELECT a.id AS attempt_id, a.task_id, t.step_id, s.job_id, t.run_id,"
        f" s.name AS step_name, j.name AS job_name, {run_columns}"
        " FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN steps s ON s.id = t.step_id"
        " JOIN jobs j ON j.id = s.job_id JOIN runs r ON r.id = t.run_id WHERE a.id = $1",
        attempt_id,
    )


async def set_state(
    conn: Connection,
    table: str,
    row_id: int,
    state: str,
    *,
    message: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Set a run, job, step or task state, stamping started_at and finished_at."""
    assert table in ("runs", "jobs", "steps", "tasks")
    assignments = ["state = $2"]
    values: list[Any] = [row_id, state]
    if state == "running":
        assignments.append("started_at = coalesce(started_at, now())")
    if state in FINAL_STATES:
        assignments.append("finished_at = coalesce(finished_at, now())")
    if message is not None:
        values.append(message)
        assignments.append(f"message = ${len(values)}")
    for column, value in (extra or {}).items():
        values.append(value)
        assignments.append(f"{column} = ${len(values)}")
    await conn.execute(f"UPDATE {table} SET {', '.join(assignments)} WHERE id = $1", *values)
