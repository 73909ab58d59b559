"""The webhook action: callback tokens only for attempts that can use them, and one HTTP
session for every attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.actions.webhook import WebhookAction
from bot.config import Settings
from bot.net.http import make_session
from tests.fakes.target import FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core


@pytest.mark.parametrize(
    ("arguments", "needed"),
    [
        ({"url": "http://127.0.0.1:9/"}, False),
        ({"url": "http://127.0.0.1:9/", "mode": "sync"}, False),
        ({"url": "http://127.0.0.1:9/", "mode": "async"}, True),
        ({"url": "http://127.0.0.1:9/", "mode": "${labels.mode}"}, True),
        ({"url": "http://127.0.0.1:9/", "body": {"back": "${callback_url}"}}, True),
    ],
)
def test_needs_callback_by_arguments(arguments: dict[str, Any], needed: bool) -> None:
    assert WebhookAction(Settings()).needs_callback(arguments) is needed


@pytest.fixture
async def core(db: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    async with running_core(db, fast_settings(database_dsn)) as harness:
        yield harness


def one_task(mode: str) -> str:
    return (
        "jobs:\n  - name: build\n    steps:\n      - name: only\n        tasks:\n"
        "          - name: call\n            action: webhook\n            arguments:\n"
        '              url: "${labels.target}/hook"\n'
        f"              mode: {mode}\n"
    )


async def test_sync_webhook_gets_no_token(core: Harness, fake_target: FakeTarget) -> None:
    run_id = await core.start_run(one_task("sync"), {"target": fake_target.base_url})
    assert await core.wait_run(run_id) == "succeeded"
    assert await core.pool.fetchval("SELECT count(*) FROM callbacks") == 0
    assert "X-KubeCI-Callback-URL" not in fake_target.received("/hook")[0].headers


async def test_async_webhook_gets_token(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/hook", Reply(status=202))
    run_id = await core.start_run(one_task("async"), {"target": fake_target.base_url})
    async with asyncio.timeout(10.0):
        while [a["state"] for a in await core.attempts(run_id, "call")] != ["waiting"]:
            await asyncio.sleep(0.05)
    assert await core.pool.fetchval("SELECT count(*) FROM callbacks") == 1
    assert "X-KubeCI-Callback-URL" in fake_target.received("/hook")[0].headers


async def test_session_shared_and_closed_on_stop(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    settings = fast_settings(database_dsn)
    opened: list[aiohttp.ClientSession] = []

    def session_factory() -> aiohttp.ClientSession:
        opened.append(make_session(settings))
        return opened[-1]

    action = WebhookAction(settings, session_factory)
    text = one_task("sync").replace("          - name: call\n", "")
    tasks = "".join(
        f"          - name: call{i}\n            action: webhook\n            arguments:\n"
        f'              url: "${{labels.target}}/hook"\n'
        for i in range(3)
    )
    text = text.split("        tasks:\n")[0] + "        tasks:\n" + tasks
    async with running_core(db, settings, actions={"webhook": action}) as core:
        run_id = await core.start_run(text, {"target": fake_target.base_url})
        assert await core.wait_run(run_id) == "succeeded"
    assert len(fake_target.received("/hook")) == 3
    assert len(opened) == 1
    assert opened[0].closed
