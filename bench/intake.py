"""Webhook intake: `kubeci serve` receiving signed GitHub push deliveries.

Each delivery has its own delivery id and head SHA; the pipeline file comes from a fake
GitHub. Its one job runs only for tags, so a branch push creates a run whose job is
skipped: the figure is what accepting a delivery costs, not what running it costs.

`intake_env` is the one place that sets where `kubeci serve` finds GitHub and which secret
signs deliveries. When `kubeci serve` has no GitHub webhook route, the benchmark is
skipped with a reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.fakegithub import FakeGitHub
from bench.kubeci import Served, kubeci_serve
from bench.load import LoadShape, send_load
from bench.payloads import PushDeliveries
from bench.procs import CpuClock, py_spy

WEBHOOK_PATH = "/webhooks/github"
SECRET = "bench-webhook-secret"
REPOSITORY = "bench-org/bench-repo"
ACCEPTED = frozenset({200, 201, 202})
UNAVAILABLE = "intake endpoint not available"

PIPELINE = """\
version: 1
jobs:
  - name: release
    rules: {label: event, exact: tag}
    steps:
      - name: notify
        tasks:
          - name: announce
            action: webhook
            arguments:
              url: "http://127.0.0.1:9/never-called"
"""


def intake_env(github_url: str) -> dict[str, str]:
    """Settings for `kubeci serve`: the fake GitHub's URL, a token and the webhook secret."""
    return {
        "KUBECI_GITHUB_API_URL": github_url,
        "KUBECI_GITHUB_TOKEN": "bench-token",
        "KUBECI_GITHUB_WEBHOOK_SECRET": SECRET,
    }


async def probe_intake(served: Served, deliveries: PushDeliveries) -> str:
    """Return "" when POST /webhooks/github accepts a signed ping, else why not."""
    body, headers = deliveries.ping()
    async with (
        aiohttp.ClientSession() as session,
        session.post(served.base_url + WEBHOOK_PATH, data=body, headers=headers) as response,
    ):
        text = (await response.text())[:200]
        if response.status in ACCEPTED:
            return ""
        if response.status in (404, 405):
            route = f"POST {WEBHOOK_PATH}"
            return f"{UNAVAILABLE}: `kubeci serve` returned HTTP {response.status} for {route}"
        return f"{UNAVAILABLE}: a signed ping got HTTP {response.status}: {text}"


async def intake(
    dsn: str, shape: LoadShape, log_dir: Path, run: int = 1, profile: bool = False
) -> dict[str, Any]:
    """Accepted deliveries/s and latency; {"skipped": reason} when there is no intake.

    With `profile`, record py-spy's collapsed stacks of `kubeci serve` while the load runs.
    """
    github = await FakeGitHub(REPOSITORY, PIPELINE).start()
    deliveries = PushDeliveries(SECRET, REPOSITORY)
    try:
        log_path = log_dir / f"intake-serve-{run}.log"
        async with kubeci_serve(dsn, log_path, intake_env(github.base_url)) as served:
            reason = await probe_intake(served, deliveries)
            if reason:
                return {"skipped": reason}
            clock = CpuClock({"server": served.process.pid})
            url = served.base_url + WEBHOOK_PATH
            svg_path = log_dir.parent / f"intake-profile-{run}.txt" if profile else None
            async with py_spy(served.process.pid, svg_path):
                result = await send_load(url, deliveries.delivery, shape, clock.start)
                cores = clock.cores_used()
            served.process.check_alive()
    finally:
        await github.close()
    stored = await _count_deliveries(dsn)
    return {
        **result.figures(ACCEPTED),
        **cores,
        "deliveries_stored": stored,
        "github_requests": dict(github.requests),
    }


async def _count_deliveries(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM deliveries"))
    finally:
        await conn.close()
