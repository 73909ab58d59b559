"""Steps decided from their task counters while completions run at once.

Completions of tasks without a step handler run without the job's lock. These tests
create a run without a worker, mark its attempts as running, and record many outcomes
at the same time on separate connections, as several workers would.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bot.actions.base import AttemptResult
from bot.engine.core import RunRequest
from bot.engine.rows import counter_shards
from pipelines_schema.loader import load_pipeline
from tests.harness import Harness, fast_settings, running_core


@pytest.fixture
async def core(db: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    async with running_core(db, fast_settings(database_dsn), start_worker=False) as harness:
        yield harness


def step_yaml(name: str, tasks: list[tuple[str, str]]) -> str:
    """A step of webhook tasks; each task is (name, extra YAML lines at task level)."""
    text = f"      - name: {name}\n        tasks:\n"
    for task_name, extra in tasks:
        text += (
            f"          - name: {task_name}\n"
            "            action: webhook\n"
            '            arguments: {url: "http://127.0.0.1:9/never"}\n'
        )
        if extra:
            text += f"            {extra}\n"
    return text


async def start(core: Harness, *steps: str) -> int:
    text = "jobs:\n  - name: build\n    steps:\n" + "".join(steps)
    async with core.pool.acquire() as conn, conn.transaction():
        request = RunRequest(pipeline=load_pipeline(text), labels={})
        return await core.engine.create_run(conn, request)


async def claim(core: Harness, run_id: int) -> dict[str, int]:
    """Mark the run's queued attempts as running; return attempt ids by task name."""
    rows = await core.pool.fetch(
        "UPDATE attempts a SET state = 'running', lease_owner = 'test',"
        " lease_expires_at = now() + interval '1 minute'"
        " FROM tasks t WHERE t.id = a.task_id AND t.run_id = $1 AND a.state = 'queued'"
        " RETURNING a.id, t.name",
        run_id,
    )
    return {row["name"]: row["id"] for row in rows}


async def complete(core: Harness, attempt_id: int, result: AttemptResult) -> bool:
    async with core.pool.acquire() as conn, conn.transaction():
        return await core.engine.complete_attempt(conn, attempt_id, result)


async def complete_all(core: Harness, results: dict[int, AttemptResult]) -> None:
    await asyncio.gather(*(complete(core, aid, result) for aid, result in results.items()))


async def events(core: Harness, run_id: int) -> list[tuple[str, str, str]]:
    return await core.events(run_id)


@pytest.mark.parametrize(("started", "shards"), [(1, 1), (7, 1), (16, 2), (100, 12), (1000, 16)])
def test_counter_shards_by_step_size(started: int, shards: int) -> None:
    assert counter_shards(started) == shards


async def test_counter_concurrent_successes_decide_once(core: Harness) -> None:
    names = [f"t{i}" for i in range(40)]
    run_id = await start(
        core, step_yaml("first", [(n, "") for n in names]), step_yaml("second", [("last", "")])
    )
    attempts = await claim(core, run_id)
    await complete_all(core, {aid: AttemptResult.success("ok") for aid in attempts.values()})
    first = await core.state("steps", run_id, "first")
    assert first["state"] == "succeeded"
    assert (await core.state("steps", run_id, "second"))["state"] == "running"
    found = await events(core, run_id)
    assert found.count(("step", "succeeded", "first")) == 1
    last_task_event = max(i for i, event in enumerate(found) if event[0] == "task")
    assert found.index(("step", "succeeded", "first")) > found.index(("task", "complete", "t0"))
    assert found.index(("step", "succeeded", "first")) < last_task_event  # "last" started
    counters = await core.pool.fetch(
        "SELECT s.name, count(*) AS shards, sum(c.unfinished) AS unfinished"
        " FROM step_counters c JOIN steps s ON s.id = c.step_id"
        " GROUP BY s.name, s.position ORDER BY s.position"
    )
    found_counters = [(row["name"], row["shards"], row["unfinished"]) for row in counters]
    assert found_counters == [("first", counter_shards(40), 0), ("second", 1, 1)]


async def test_counter_step_events_follow_every_task(core: Harness) -> None:
    names = [f"t{i}" for i in range(12)]
    run_id = await start(core, step_yaml("only", [(n, "") for n in names]))
    attempts = await claim(core, run_id)
    await complete_all(core, {aid: AttemptResult.success("ok") for aid in attempts.values()})
    assert await core.wait_run(run_id) == "succeeded"
    found = await events(core, run_id)
    step_at = found.index(("step", "succeeded", "only"))
    for name in names:
        assert found.index(("task", "complete", name)) < step_at


async def test_counter_failure_among_successes_fails_step(core: Harness) -> None:
    names = [f"t{i}" for i in range(10)]
    run_id = await start(core, step_yaml("only", [(n, "") for n in names]))
    attempts = await claim(core, run_id)
    results = {aid: AttemptResult.success("ok") for aid in attempts.values()}
    results[attempts["t3"]] = AttemptResult.failure("HTTP 400", retryable=False)
    await complete_all(core, results)
    step = await core.state("steps", run_id, "only")
    assert step["state"] == "failed"
    assert step["message"] == "failed task(s): t3"
    assert await core.wait_run(run_id) == "failed"


async def test_counter_retry_keeps_step_waiting(core: Harness) -> None:
    run_id = await start(core, step_yaml("only", [("flaky", "retries: 1"), ("steady", "")]))
    attempts = await claim(core, run_id)
    await complete_all(
        core,
        {
            attempts["flaky"]: AttemptResult.failure("HTTP 503"),
            attempts["steady"]: AttemptResult.success("ok"),
        },
    )
    assert (await core.state("steps", run_id, "only"))["state"] == "running"
    await core.pool.execute("UPDATE attempts SET due_at = now() WHERE state = 'queued'")
    second = await claim(core, run_id)
    assert await complete(core, second["flaky"], AttemptResult.success("ok"))
    assert (await core.state("steps", run_id, "only"))["state"] == "succeeded"


async def test_counter_handler_races_completions(core: Harness) -> None:
    others = [f"t{i}" for i in range(10)]
    tasks = [("decider", "event_handlers: {succeeded: set_step_failure}")]
    run_id = await start(core, step_yaml("only", tasks + [(n, "") for n in others]))
    attempts = await claim(core, run_id)
    await complete_all(core, {aid: AttemptResult.success("ok") for aid in attempts.values()})
    step = await core.state("steps", run_id, "only")
    assert step["state"] == "failed"
    assert step["decided_by"] == "decider:set_step_failure"
    found = await events(core, run_id)
    assert ("step", "succeeded", "only") not in found
    completes = Counter(event[2] for event in found if event[:2] == ("task", "complete"))
    assert set(completes.values()) == {1}
    assert len(completes) == len(others) + 1
    for name in others:
        state = (await core.state("tasks", run_id, name))["state"]
        assert state in ("succeeded", "cancelled")
        assert (("task", "succeeded", name) in found) == (state == "succeeded")


async def test_counter_cancel_races_completions(core: Harness) -> None:
    names = [f"t{i}" for i in range(10)]
    run_id = await start(core, step_yaml("only", [(n, "") for n in names]))
    attempts = await claim(core, run_id)

    async def cancel() -> None:
        async with core.pool.acquire() as conn, conn.transaction():
            await core.engine.cancel_run(conn, run_id, reason="stopped by test")

    completions = [complete(core, aid, AttemptResult.success("ok")) for aid in attempts.values()]
    await asyncio.gather(cancel(), *completions)
    assert await core.wait_run(run_id) == "cancelled"
    found = await events(core, run_id)
    completes = Counter(event[2] for event in found if event[:2] == ("task", "complete"))
    assert completes == Counter(names)
    assert found.count(("step", "complete", "only")) == 1


async def test_counter_non_interruptible_task_detached(core: Harness) -> None:
    tasks = [
        ("decider", "event_handlers: {succeeded: set_step_success}"),
        ("deploy", "interruptible: false"),
    ]
    run_id = await start(core, step_yaml("only", tasks), step_yaml("next", [("after", "")]))
    attempts = await claim(core, run_id)
    assert await complete(core, attempts["decider"], AttemptResult.success("ok"))
    assert (await core.state("tasks", run_id, "deploy"))["detached"] is True
    assert await complete(core, attempts["deploy"], AttemptResult.failure("boom", retryable=False))
    assert (await core.state("steps", run_id, "only"))["state"] == "succeeded"
    assert (await core.state("tasks", run_id, "deploy"))["state"] == "failed"
    assert (await core.state("steps", run_id, "next"))["state"] == "running"
