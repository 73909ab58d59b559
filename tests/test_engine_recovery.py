"""Durability: a worker killed mid-attempt loses nothing, and secrets stay secret."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg
import pytest

from bot.actions.webhook import WebhookAction
from bot.net.http import make_session
from tests.fakes.target import FakeTarget, Reply, StubResolver, guard_tripwire
from tests.harness import fast_settings, running_core

SLOW_TASK = """
jobs:
  - name: build
    steps:
      - name: first
        tasks:
          - name: slow
            action: webhook
            arguments: {url: "${labels.target}/slow"}
          - name: quick
            action: webhook
            arguments: {url: "${labels.target}/quick"}
"""


async def _wait_for_request(target: FakeTarget, path: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not target.received(path):
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_killed_worker_attempt_is_recovered(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    fake_target.script("/slow", Reply(delay_s=2.0))
    settings = fast_settings(database_dsn, lease_s=1.5)
    async with running_core(db, settings, start_worker=False) as core:
        run_id = await core.start_run(SLOW_TASK, {"target": fake_target.base_url})
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.worker_process",
            database_dsn,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            await _wait_for_request(fake_target, "/slow")
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        owner = await db.fetchval(
            "SELECT a.lease_owner FROM attempts a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.name = 'slow'"
        )
        assert owner == "doomed-worker"
        fake_target.script("/slow", Reply())
        await core.services.start_background()
        assert await core.wait_run(run_id, timeout_s=20) == "succeeded"
        slow_requests = fake_target.received("/slow")
        keys = {request.headers["Idempotency-Key"] for request in slow_requests}
        assert len(slow_requests) == 2
        assert len(keys) == 1
        attempts = await core.attempts(run_id, "slow")
        assert [a["state"] for a in attempts] == ["succeeded"]
        assert attempts[0]["lease_owner"] is None
        events = await core.events(run_id)
        assert events.count(("task", "succeeded", "slow")) == 1
        assert events.count(("task", "succeeded", "quick")) == 1


SECRET_TASK = """
jobs:
  - name: build
    steps:
      - name: first
        tasks:
          - name: deploy
            action: webhook
            arguments:
              url: "${labels.target}/deploy"
              headers: {Authorization: "Bearer ${secrets.DEPLOY_TOKEN}"}
"""


async def test_secret_filled_and_masked(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    token = "s3cr3t-token-value"
    fake_target.script("/deploy", Reply(status=500, body=f"bad token {token}"))
    settings = fast_settings(database_dsn, secrets={"DEPLOY_TOKEN": token})
    async with running_core(db, settings) as core:
        run_id = await core.start_run(SECRET_TASK, {"target": fake_target.base_url})
        assert await core.wait_run(run_id) == "failed"
    assert fake_target.received("/deploy")[0].headers["Authorization"] == f"Bearer {token}"
    for table, column in (
        ("attempts", "response_excerpt"),
        ("attempts", "message"),
        ("logs", "content"),
        ("events", "payload::text"),
        ("runs", "pipeline::text"),
    ):
        leaked = await db.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} LIKE '%' || $1 || '%'", token
        )
        assert leaked == 0, f"{table}.{column} holds the secret"
    excerpt = await db.fetchval("SELECT response_excerpt FROM attempts")
    assert "***" in excerpt


async def test_untrusted_run_gets_no_secret(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    settings = fast_settings(database_dsn, secrets={"DEPLOY_TOKEN": "x" * 20})
    async with running_core(db, settings) as core:
        run_id = await core.start_run(SECRET_TASK, {"target": fake_target.base_url}, trusted=False)
        assert await core.wait_run(run_id) == "failed"
        message = (await core.state("tasks", run_id, "deploy"))["message"]
    assert "untrusted" in message
    assert fake_target.received() == []


async def test_metadata_address_refused(db: asyncpg.Pool, database_dsn: str) -> None:
    # The host resolves, through a stub, to the cloud metadata address; the guard must
    # refuse it before any connection (the tripwire fails the test if one starts).
    stub = StubResolver({"metadata.test": ["169.254.169.254"]})
    settings = fast_settings(database_dsn)
    action = WebhookAction(
        settings,
        session_factory=lambda: make_session(
            settings, resolver=stub, trace_configs=[guard_tripwire(stub)]
        ),
    )
    text = SLOW_TASK.replace("${labels.target}/slow", "http://metadata.test/latest")
    text = text.replace("${labels.target}/quick", "http://metadata.test/other")
    async with running_core(db, settings, actions={"webhook": action}) as core:
        run_id = await core.start_run(text, {})
        assert await core.wait_run(run_id) == "failed"
        message = (await core.state("tasks", run_id, "slow"))["message"]
        attempts = await core.attempts(run_id, "slow")
    assert "169.254.169.254" in message
    assert len(attempts) == 1


async def test_pinned_run_left_to_its_process(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    # `kubeci run` pins its run; a service sharing the database must not run it.
    async with running_core(db, fast_settings(database_dsn)) as core:
        run_id = await core.start_run(
            SLOW_TASK, {"target": fake_target.base_url}, pinned_to="kubeci-run-elsewhere"
        )
        await asyncio.sleep(1.0)
        assert fake_target.received() == []
        core.services.worker.pinned_to = "kubeci-run-elsewhere"
        assert await core.wait_run(run_id) == "succeeded"
    assert len(fake_target.received()) == 2
