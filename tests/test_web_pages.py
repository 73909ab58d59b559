"""Run pages, health checks and metrics, served by the real application."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from bot.web.runs import MAX_PAGE_LOG_CHARS
from tests.fakes.target import FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core

PIPELINE = """
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: unit
            action: webhook
            arguments: {url: "${labels.target}/unit"}
"""


@pytest.fixture
async def core(db: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    async with running_core(db, fast_settings(database_dsn)) as harness:
        yield harness


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_run_page_shows_tasks_and_logs(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/unit", Reply(status=500, body="<boom> & more"))
    run_id = await core.start_run(PIPELINE, {"target": fake_target.base_url, "branch": "ü/main"})
    assert await core.wait_run(run_id) == "failed"
    status, content_type, body = await _get(core.engine.run_url(run_id))
    assert status == 200
    assert content_type.startswith("text/html")
    assert "Job build" in body
    assert "unit" in body
    assert "HTTP 500" in body
    assert "&lt;boom&gt; &amp; more" in body
    assert "<boom>" not in body
    assert "ü/main" in body


async def test_run_page_json(core: Harness, fake_target: FakeTarget) -> None:
    run_id = await core.start_run(PIPELINE, {"target": fake_target.base_url})
    assert await core.wait_run(run_id) == "succeeded"
    async with (
        aiohttp.ClientSession() as session,
        session.get(core.engine.run_url(run_id) + ".json") as response,
    ):
        data = await response.json()
    assert data["state"] == "succeeded"
    assert data["jobs"][0]["steps"][0]["tasks"][0]["name"] == "unit"
    assert "spec" not in data["jobs"][0]


async def test_run_page_long_log_tail(
    core: Harness, db: asyncpg.Pool, fake_target: FakeTarget
) -> None:
    run_id = await core.start_run(PIPELINE, {"target": fake_target.base_url})
    assert await core.wait_run(run_id) == "succeeded"
    attempt_id = await db.fetchval(
        "SELECT a.id FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = $1",
        run_id,
    )
    # 40,000 rows of 11 characters: more than twice what the page shows.
    await db.execute(
        "INSERT INTO logs (attempt_id, content)"
        " SELECT $1, 'line ' || lpad(n::text, 5, '0') || E'\\n' FROM generate_series(1, 40000) n",
        attempt_id,
    )
    rows = await db.fetch("SELECT content FROM logs WHERE attempt_id = $1 ORDER BY id", attempt_id)
    full_log = "".join(row["content"] for row in rows)

    status, _, body = await _get(core.engine.run_url(run_id))
    async with (
        aiohttp.ClientSession() as session,
        session.get(core.engine.run_url(run_id) + ".json") as response,
    ):
        attempt = (await response.json())["jobs"][0]["steps"][0]["tasks"][0]["attempt_list"][0]
    assert status == 200
    assert f"[showing the last {MAX_PAGE_LOG_CHARS} characters]" in body
    assert "line 40000" in body
    assert "line 00001" not in body
    assert attempt["log"] == full_log[-MAX_PAGE_LOG_CHARS:]
    assert attempt["log_total_chars"] == len(full_log)


async def test_run_page_short_log_whole(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/unit", Reply(status=500, body="short failure"))
    run_id = await core.start_run(PIPELINE, {"target": fake_target.base_url})
    assert await core.wait_run(run_id) == "failed"
    _, _, body = await _get(core.engine.run_url(run_id))
    assert "short failure" in body
    assert "[showing the last" not in body


async def test_run_page_unknown_and_invalid_ids(core: Harness) -> None:
    base = core.engine.settings.callback_base_url
    assert (await _get(f"{base}/runs/999999"))[0] == 404
    status, _, body = await _get(f"{base}/runs/abc")
    assert status == 404
    assert "invalid run id" in body


async def test_health_and_readiness(core: Harness) -> None:
    base = core.engine.settings.callback_base_url
    assert (await _get(f"{base}/healthz"))[0] == 200
    status, _, body = await _get(f"{base}/readyz")
    assert status == 200
    assert "ready" in body


async def test_metrics_report_runs_and_outbox(core: Harness, fake_target: FakeTarget) -> None:
    run_id = await core.start_run(PIPELINE, {"target": fake_target.base_url})
    assert await core.wait_run(run_id) == "succeeded"
    status, _, body = await _get(core.engine.settings.callback_base_url + "/metrics")
    assert status == 200
    assert 'kubeci_runs{state="succeeded"} 1.0' in body
    assert "kubeci_outbox_backlog" in body
    assert "kubeci_outbox_oldest_age_seconds" in body
