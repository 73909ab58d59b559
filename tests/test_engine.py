"""Pipeline semantics end to end: real engine, worker and webhook action, real Postgres,
and a fake webhook target on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.fakes.target import Callback, FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core


@pytest.fixture
async def core(db: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    async with running_core(db, fast_settings(database_dsn)) as harness:
        yield harness


def task(name: str, path: str, extra: str = "") -> str:
    """A webhook task calling `path` on the target given by the `target` label."""
    lines = [
        f"          - name: {name}",
        "            action: webhook",
        "            backoff: {initial_s: 0.05, factor: 2, max_s: 0.2}",
        "            arguments:",
        f'              url: "${{labels.target}}{path}"',
    ]
    return "\n".join(lines) + ("\n" + extra if extra else "") + "\n"


def pipeline(*steps: tuple[str, str], job_extra: str = "") -> str:
    text = "jobs:\n  - name: build\n" + job_extra + "    steps:\n"
    for name, tasks in steps:
        text += f"      - name: {name}\n        tasks:\n{tasks}"
    return text


def labels(target: FakeTarget) -> dict[str, str]:
    return {"target": target.base_url, "branch": "main", "event": "push"}


async def test_steps_run_in_order_and_tasks_in_parallel(
    core: Harness, fake_target: FakeTarget
) -> None:
    fake_target.script("/a", Reply(delay_s=0.3))
    fake_target.script("/b", Reply(delay_s=0.3))
    text = pipeline(("first", task("a", "/a") + task("b", "/b")), ("second", task("c", "/c")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    paths = [request.path for request in fake_target.received()]
    assert sorted(paths[:2]) == ["/a", "/b"]
    assert paths[2] == "/c"
    first = await core.state("steps", run_id, "first")
    second = await core.state("steps", run_id, "second")
    assert second["started_at"] >= first["finished_at"]
    a = await core.state("tasks", run_id, "a")
    b = await core.state("tasks", run_id, "b")
    assert b["started_at"] < a["finished_at"]


async def test_event_order_on_success(core: Harness, fake_target: FakeTarget) -> None:
    run_id = await core.start_run(pipeline(("only", task("a", "/a"))), labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    assert await core.events(run_id) == [
        ("job", "started", "build"),
        ("step", "started", "only"),
        ("task", "started", "a"),
        ("task", "succeeded", "a"),
        ("task", "complete", "a"),
        ("step", "succeeded", "only"),
        ("step", "complete", "only"),
        ("job", "succeeded", "build"),
        ("job", "complete", "build"),
        ("run", "complete", "run"),
    ]


async def test_failed_task_fails_step_and_skips_rest(
    core: Harness, fake_target: FakeTarget
) -> None:
    fake_target.script("/bad", Reply(status=400))
    text = pipeline(("first", task("bad", "/bad")), ("second", task("c", "/c")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    assert (await core.state("steps", run_id, "first"))["state"] == "failed"
    assert (await core.state("steps", run_id, "second"))["state"] == "skipped"
    assert (await core.state("tasks", run_id, "c"))["state"] == "skipped"
    assert (await core.state("jobs", run_id, "build"))["state"] == "failed"
    events = await core.events(run_id)
    assert ("task", "failed", "bad") in events
    assert events.index(("task", "failed", "bad")) < events.index(("task", "complete", "bad"))
    assert not [event for event in events if event[2] in ("second", "c")]
    assert fake_target.received("/c") == []


async def test_allow_failure_keeps_step_green(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/bad", Reply(status=500))
    text = pipeline(
        ("first", task("bad", "/bad", "            allow_failure: true") + task("a", "/a"))
    )
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    assert (await core.state("tasks", run_id, "bad"))["state"] == "failed"
    assert (await core.state("steps", run_id, "first"))["state"] == "succeeded"


async def test_set_step_failure_cancels_siblings(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/slow", Reply(delay_s=5))
    handler = "            event_handlers: {succeeded: set_step_failure}"
    text = pipeline(("first", task("quick", "/quick", handler) + task("slow", "/slow")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    step = await core.state("steps", run_id, "first")
    assert step["state"] == "failed"
    assert step["decided_by"] == "quick:set_step_failure"
    slow = await core.state("tasks", run_id, "slow")
    assert slow["state"] == "cancelled"
    assert [a["state"] for a in await core.attempts(run_id, "slow")] == ["cancelled"]


async def test_set_step_success_overrides_failure(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/bad", Reply(status=422))
    fake_target.script("/slow", Reply(delay_s=5))
    handler = "            event_handlers: {failed: set_step_success}"
    text = pipeline(
        ("first", task("bad", "/bad", handler) + task("slow", "/slow")), ("second", task("c", "/c"))
    )
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    assert (await core.state("steps", run_id, "first"))["state"] == "succeeded"
    assert (await core.state("tasks", run_id, "slow"))["state"] == "cancelled"
    assert (await core.state("tasks", run_id, "c"))["state"] == "succeeded"


async def test_set_job_success_on_step_failure(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/bad", Reply(status=400))
    text = (
        "jobs:\n  - name: build\n    steps:\n"
        "      - name: first\n        event_handlers: {failed: set_job_success}\n"
        "        tasks:\n"
        + task("bad", "/bad")
        + "      - name: second\n        tasks:\n"
        + task("c", "/c")
    )
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    assert (await core.state("steps", run_id, "first"))["state"] == "failed"
    assert (await core.state("steps", run_id, "second"))["state"] == "skipped"
    job = await core.state("jobs", run_id, "build")
    assert job["state"] == "succeeded"
    assert fake_target.received("/c") == []


async def test_set_job_failure_on_step_success(core: Harness, fake_target: FakeTarget) -> None:
    text = (
        "jobs:\n  - name: build\n    steps:\n"
        "      - name: first\n        event_handlers: {succeeded: set_job_failure}\n"
        "        tasks:\n"
        + task("a", "/a")
        + "      - name: second\n        tasks:\n"
        + task("c", "/c")
    )
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    assert (await core.state("steps", run_id, "first"))["state"] == "succeeded"
    assert (await core.state("steps", run_id, "second"))["state"] == "skipped"


async def test_first_decision_wins(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/late", Reply(delay_s=0.4))
    early = "            event_handlers: {succeeded: set_step_failure}"
    late = (
        "            event_handlers: {succeeded: set_step_success}\n"
        "            interruptible: false"
    )
    text = pipeline(("first", task("early", "/early", early) + task("late", "/late", late)))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    late_task = await core.state("tasks", run_id, "late")
    assert late_task["state"] == "succeeded"
    assert late_task["detached"] is True
    rows = await core.pool.fetch(
        "SELECT payload->>'message' AS message FROM events WHERE run_id = $1"
        " AND name = 'handler_ignored'",
        run_id,
    )
    assert len(rows) == 1
    assert "set_step_success" in rows[0]["message"]


async def test_non_interruptible_task_finishes(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/bad", Reply(status=400))
    fake_target.script("/deploy", Reply(delay_s=0.5))
    handler = "            event_handlers: {failed: set_step_failure}"
    keep = "            interruptible: false"
    text = pipeline(("first", task("bad", "/bad", handler) + task("deploy", "/deploy", keep)))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    deploy = await core.state("tasks", run_id, "deploy")
    assert deploy["state"] == "succeeded"
    assert (await core.state("steps", run_id, "first"))["state"] == "failed"
    events = await core.events(run_id)
    assert events.index(("step", "failed", "first")) < events.index(("task", "succeeded", "deploy"))


async def test_rules_skip_without_events(core: Harness, fake_target: FakeTarget) -> None:
    text = (
        "jobs:\n"
        "  - name: build\n    steps:\n"
        "      - name: first\n        tasks:\n"
        + task("a", "/a")
        + task("tag-only", "/t", "            rules: {label: tag, exists: true}")
        + "      - name: release\n        rules: {label: branch, regex: 'release/.+'}\n"
        "        tasks:\n"
        + task("r", "/r")
        + "  - name: docs\n    rules: {label: branch, exact: main, invert: true}\n"
        "    steps:\n      - name: d\n        tasks:\n" + task("d", "/d")
    )
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    assert (await core.state("tasks", run_id, "tag-only"))["state"] == "skipped"
    assert (await core.state("steps", run_id, "release"))["state"] == "skipped"
    assert (await core.state("jobs", run_id, "docs"))["state"] == "skipped"
    names = {event[2] for event in await core.events(run_id)}
    assert names.isdisjoint({"tag-only", "release", "r", "docs", "d"})
    assert {request.path for request in fake_target.received()} == {"/a"}


async def test_retries_keep_idempotency_key(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/flaky", Reply(status=503), Reply(status=503), Reply(status=200))
    text = pipeline(("first", task("flaky", "/flaky", "            retries: 2")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    keys = {request.headers["Idempotency-Key"] for request in fake_target.received("/flaky")}
    assert len(fake_target.received("/flaky")) == 3
    assert len(keys) == 1
    attempts = await core.attempts(run_id, "flaky")
    assert [a["state"] for a in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[1]["due_at"] >= attempts[0]["finished_at"]
    events = await core.events(run_id)
    assert events.count(("task", "attempt_failed", "flaky")) == 2


async def test_retries_exhausted_fail_task(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/down", Reply(status=502))
    text = pipeline(("first", task("down", "/down", "            retries: 1")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    assert len(fake_target.received("/down")) == 2
    events = await core.events(run_id)
    assert events.count(("task", "failed", "down")) == 1


async def test_client_error_is_not_retried(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/gone", Reply(status=404))
    text = pipeline(("first", task("gone", "/gone", "            retries: 3")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    assert len(fake_target.received("/gone")) == 1


async def test_retry_after_is_honoured(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/busy", Reply(status=429, headers={"Retry-After": "1"}), Reply())
    text = pipeline(("first", task("busy", "/busy", "            retries: 1")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    first, second = await core.attempts(run_id, "busy")
    assert (second["due_at"] - first["finished_at"]).total_seconds() >= 0.99


async def test_attempt_timeout_fails(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/hang", Reply(delay_s=5))
    text = pipeline(("first", task("hang", "/hang", "            timeout_s: 0.5")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    hang = await core.state("tasks", run_id, "hang")
    assert "timed out" in hang["message"]


async def test_job_timeout_fails_job(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/hang", Reply(delay_s=5))
    text = pipeline(("first", task("hang", "/hang")), job_extra="    timeout_s: 0.5\n")
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    job = await core.state("jobs", run_id, "build")
    assert "timed out" in job["message"]
    assert (await core.state("tasks", run_id, "hang"))["state"] == "cancelled"


ASYNC_TASK = (
    "            timeout_s: {timeout}\n"
    "            arguments:\n"
    '              url: "${{labels.target}}/async"\n'
    "              mode: async\n"
    '              body: {{callback: "${{callback_url}}"}}\n'
)


def async_pipeline(timeout_s: float = 5) -> str:
    return (
        "jobs:\n  - name: build\n    steps:\n      - name: first\n        tasks:\n"
        "          - name: remote\n            action: webhook\n"
        + ASYNC_TASK.format(timeout=timeout_s)
    )


async def test_async_callback_success(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202, callback=Callback("succeeded", "built")))
    run_id = await core.start_run(async_pipeline(), labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    request = fake_target.received("/async")[0]
    assert request.json()["callback"] == request.headers["X-KubeCI-Callback-URL"]
    remote = await core.state("tasks", run_id, "remote")
    assert remote["message"] == "built"


async def test_async_callback_failure(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202, callback=Callback("failed", "tests red")))
    run_id = await core.start_run(async_pipeline(), labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    assert (await core.state("tasks", run_id, "remote"))["message"] == "tests red"


async def test_async_without_callback_times_out(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202))
    run_id = await core.start_run(async_pipeline(timeout_s=0.5), labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    remote = await core.state("tasks", run_id, "remote")
    assert "waiting for the callback" in remote["message"]


async def test_callback_token_replayed_or_forged(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202, callback=Callback("succeeded")))
    run_id = await core.start_run(async_pipeline(), labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    url = fake_target.received("/async")[0].headers["X-KubeCI-Callback-URL"]
    forged = url.rsplit("/", 1)[0] + "/" + "A" * 43
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"status": "failed"}) as replay:
            assert replay.status == 404
        async with session.post(forged, json={"status": "succeeded"}) as forgery:
            assert forgery.status == 404
    assert (await core.state("tasks", run_id, "remote"))["state"] == "succeeded"


async def test_callback_bad_body_keeps_token(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202))
    run_id = await core.start_run(async_pipeline(), labels(fake_target))
    async with asyncio.timeout(5):
        while not fake_target.received("/async"):
            await asyncio.sleep(0.05)
    url = fake_target.received("/async")[0].headers["X-KubeCI-Callback-URL"]
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"{not json") as bad:
            assert bad.status == 400
        async with session.post(url, json={"status": "done"}) as wrong:
            assert wrong.status == 400
            assert "succeeded" in (await wrong.json())["error"]
        async with session.post(url, json={"status": "succeeded"}) as good:
            assert good.status == 200
    assert await core.wait_run(run_id) == "succeeded"


async def test_cancel_run_stops_tasks(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/hang", Reply(delay_s=10))
    run_id = await core.start_run(pipeline(("first", task("hang", "/hang"))), labels(fake_target))
    async with asyncio.timeout(5):
        while not fake_target.received("/hang"):
            await asyncio.sleep(0.05)
    async with core.pool.acquire() as conn, conn.transaction():
        await core.engine.cancel_run(conn, run_id, reason="cancelled by a test")
    assert await core.wait_run(run_id, timeout_s=5) == "cancelled"
    assert [a["state"] for a in await core.attempts(run_id, "hang")] == ["cancelled"]
    events = await core.events(run_id)
    assert ("job", "complete", "build") in events
    assert ("job", "failed", "build") not in events


async def test_missing_label_fails_task(core: Harness, fake_target: FakeTarget) -> None:
    text = pipeline(("first", task("pr", "/pr?n=${pr.number}")))
    run_id = await core.start_run(text, labels(fake_target))
    assert await core.wait_run(run_id) == "failed"
    message = (await core.state("tasks", run_id, "pr"))["message"]
    assert "pr.number" in message
    assert fake_target.received() == []
