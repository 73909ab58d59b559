"""The benchmark harness still starts: every benchmark at a tiny size, on the test server.

These check that the harness runs and its figures add up, not how fast anything is.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp
import pytest

from bench.__main__ import SIZES, main
from bench.db import fresh_database
from bench.fakegithub import FakeGitHub
from bench.intake import PIPELINE, REPOSITORY, UNAVAILABLE, intake
from bench.memory import memory
from bench.payloads import BODY_SIZE_BYTES, PushDeliveries, signature_valid
from bench.scheduler import scheduler

TINY = SIZES["tiny"]

pytestmark = pytest.mark.slow


def test_push_delivery_signed_and_sized() -> None:
    deliveries = PushDeliveries("secret")
    body, headers = deliveries.delivery(7)
    other_body, other_headers = deliveries.delivery(8)
    assert signature_valid(b"secret", body, headers["X-Hub-Signature-256"])
    assert not signature_valid(b"wrong", body, headers["X-Hub-Signature-256"])
    assert BODY_SIZE_BYTES - 100 <= len(body) <= BODY_SIZE_BYTES
    assert json.loads(body)["after"] != json.loads(other_body)["after"]
    assert headers["X-GitHub-Delivery"] != other_headers["X-GitHub-Delivery"]


def test_limits_write_results(
    server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", server_dsn)
    results_path = tmp_path / "RESULTS.md"
    argv = ["--size", "tiny", "--runs", "1", "--only", "limits", "--out", str(tmp_path)]
    assert main([*argv, "--results", str(results_path)], configure_logging=False) == 0
    benchmarks = json.loads((tmp_path / "latest.json").read_text())["benchmarks"]
    for mode in ("plain", "verify", "insert"):
        run = benchmarks[f"limit_{mode}"]["runs"][0]
        assert run["accepted"] > 0, mode
        assert run["accepted"] == run["sent"], mode
    assert benchmarks["limit_claim"]["runs"][0]["claimed"] > 0
    assert "## Limits of this machine" in results_path.read_text()


async def test_intake_measures_or_skips(server_dsn: str, tmp_path: Path) -> None:
    async with fresh_database(server_dsn) as dsn:
        result = await intake(dsn, TINY.load, tmp_path)
    if "skipped" in result:
        assert result["skipped"].startswith(UNAVAILABLE)
    else:
        assert result["accepted"] > 0
        assert result["deliveries_stored"] >= result["accepted"]


async def test_scheduler_runs_every_task(server_dsn: str, tmp_path: Path) -> None:
    async with fresh_database(server_dsn) as dsn:
        result = await scheduler(dsn, TINY.scheduler, tmp_path)
    assert result["run_state"] == "succeeded"
    assert result["succeeded"] == TINY.scheduler.total
    assert result["tasks_per_s"] > 0


async def test_memory_parks_and_completes(server_dsn: str, tmp_path: Path) -> None:
    async with fresh_database(server_dsn) as dsn:
        result = await memory(dsn, TINY.memory, tmp_path)
    assert result["run_state"] == "succeeded"
    assert result["callbacks"] == {"200": TINY.memory.total}
    assert result["peak_rss_mb"] >= result["rss_at_start_mb"]


async def test_fake_github_serves_pipeline() -> None:
    github = await FakeGitHub(REPOSITORY, PIPELINE).start()
    contents = f"{github.base_url}/repos/{REPOSITORY}/contents/.kubeci.yml?ref=abc"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(contents) as response:
                assert response.status == 200
                body = await response.json()
            async with session.get(f"{github.base_url}/repos/other/repo/contents/x") as missing:
                assert missing.status == 404
    finally:
        await github.close()
    assert base64.b64decode(body["content"]).decode() == PIPELINE
