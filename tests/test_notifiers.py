"""Notifier rows and the webhook and Slack sinks, through the outbox, against a fake target."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot.config import Settings
from bot.net.secrets import SecretNotFound, SecretStore
from bot.notifiers import (
    SLACK_KIND,
    WEBHOOK_KIND,
    NotifierEvent,
    RunRef,
    default_slack_text,
    notifier_rows,
    notifier_sinks,
)
from bot.outbox import OutboxSender, RetryPolicy, enqueue_rows
from pipelines_schema.models import Notifier
from tests.fakes.target import FakeTarget, Reply

SECRET = "xoxb-very-secret-token"
LABELS = {"repository": "acme/web", "sha": "abc1234def5678", "branch": "main"}
RUN: RunRef = {"id": 7, "url": "http://ci.test/runs/7"}


def event(name: str = "failed", **overrides: Any) -> NotifierEvent:
    value: NotifierEvent = {
        "id": 41,
        "scope": "job",
        "name": name,
        "run_id": 7,
        "job": "build",
        "step": None,
        "task": None,
        "state": "failed",
        "message": "step test failed",
        "attempt": None,
        "at": "2024-05-01T10:00:00+00:00",
    }
    value.update(overrides)  # type: ignore[typeddict-item]
    return value


def webhook(url: str, **overrides: Any) -> Notifier:
    values: dict[str, Any] = {
        "name": "audit",
        "type": "webhook",
        "events": ("failed", "succeeded"),
        "url": url,
    }
    values.update(overrides)
    return Notifier(**values)


def slack(url: str, **overrides: Any) -> Notifier:
    values: dict[str, Any] = {"name": "chat", "type": "slack", "events": ("failed",), "url": url}
    values.update(overrides)
    return Notifier(**values)


def sender(pool: asyncpg.Pool, secrets: SecretStore | None = None) -> OutboxSender:
    store = secrets or SecretStore({"TOKEN": SECRET})
    sinks = notifier_sinks(Settings(), secrets=store)
    retry = RetryPolicy(max_attempts=3, initial_s=0.0, max_s=0.0)
    return OutboxSender(pool, sinks, "notifier-test", retry=retry, mask=store.mask)


async def enqueue_for(
    pool: asyncpg.Pool,
    notifiers: list[Notifier],
    the_event: NotifierEvent | None = None,
    trusted: bool = True,
) -> list[int]:
    rows = notifier_rows(notifiers, the_event or event(), LABELS, RUN, trusted)
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_rows(conn, rows)


async def outbox(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT * FROM outbox ORDER BY id")


async def stored_text(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT to_jsonb(o)::text AS t FROM outbox o")
        states = await conn.fetch("SELECT to_jsonb(s)::text AS t FROM sink_state s")
    return "\n".join(record["t"] for record in [*rows, *states])


def test_rows_filter_by_event() -> None:
    notifiers = [webhook("http://127.0.0.1:1/a"), slack("http://127.0.0.1:1/b")]
    rows = notifier_rows(notifiers, event("succeeded"), LABELS, RUN, True)
    assert [row.kind for row in rows] == [WEBHOOK_KIND]


def test_rows_keys_and_payload() -> None:
    rows = notifier_rows([slack("http://127.0.0.1:1/b")], event(), LABELS, RUN, False)
    row = rows[0]
    assert row.kind == SLACK_KIND
    assert row.sink_key == "notifier:7:41:chat"
    assert row.ordering_key == "notifier:7:chat"
    assert row.run_id == 7
    assert row.payload["trusted"] is False
    assert row.payload["notifier"]["events"] == ["failed"]
    assert json.loads(json.dumps(row.payload)) == row.payload


async def test_webhook_renders_secrets_at_send_time(
    db: asyncpg.Pool, fake_target: FakeTarget
) -> None:
    notifier = webhook(
        fake_target.url("/audit"),
        headers={"Authorization": "Bearer ${secrets.TOKEN}"},
        body={"sha": "${sha}", "run": "${run.url}", "what": "${event.name}"},
    )
    await enqueue_for(db, [notifier])
    assert SECRET not in await stored_text(db)

    await sender(db).drain_once()
    request = fake_target.received("/audit")[0]
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["Idempotency-Key"] == "notifier:7:41:audit"
    assert request.json() == {"sha": "abc1234def5678", "run": RUN["url"], "what": "failed"}
    assert (await outbox(db))[0]["state"] == "sent"
    assert SECRET not in await stored_text(db)


async def test_webhook_secret_from_directory(
    db: asyncpg.Pool, fake_target: FakeTarget, tmp_path: Path
) -> None:
    (tmp_path / "HOOK_KEY").write_text("from-a-file\n", encoding="utf-8")
    notifier = webhook(fake_target.url("/audit"), headers={"X-Key": "${secrets.HOOK_KEY}"})
    await enqueue_for(db, [notifier])
    await sender(db, SecretStore({}, str(tmp_path))).drain_once()
    assert fake_target.received("/audit")[0].headers["X-Key"] == "from-a-file"


async def test_webhook_default_body_is_event(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    await enqueue_for(db, [webhook(fake_target.url("/audit"))])
    await sender(db).drain_once()
    body = fake_target.received("/audit")[0].json()
    assert body["event"] == event()
    assert body["run"] == RUN
    assert body["labels"] == LABELS


async def test_webhook_method_and_text_body(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    notifier = webhook(fake_target.url("/audit"), method="PUT", body="job ${event.job} ${sha}")
    await enqueue_for(db, [notifier])
    await sender(db).drain_once()
    request = fake_target.received("/audit")[0]
    assert request.method == "PUT"
    assert request.text == "job build abc1234def5678"


async def test_slack_default_text(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    await enqueue_for(db, [slack(fake_target.url("/slack"))])
    await sender(db).drain_once()
    assert fake_target.received("/slack")[0].json() == {
        "text": "kubeci: job build failed on acme/web@abc1234: step test failed"
        " — http://ci.test/runs/7"
    }


async def test_slack_text_template(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    notifier = slack(fake_target.url("/slack"), text="${repository} ${branch}: ${event.state}")
    await enqueue_for(db, [notifier])
    await sender(db).drain_once()
    assert fake_target.received("/slack")[0].json() == {"text": "acme/web main: failed"}


async def test_slack_url_secret_masked_in_errors(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script(f"/services/{SECRET}", Reply(404, "no_service"))
    notifier = slack(fake_target.url("/services/${secrets.TOKEN}"))
    await enqueue_for(db, [notifier])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert record["state"] == "dead"
    assert "no_service" in record["last_error"]
    assert SECRET not in await stored_text(db)


async def test_untrusted_run_gets_no_secrets(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    notifier = webhook(fake_target.url("/audit"), headers={"X-Key": "${secrets.TOKEN}"})
    await enqueue_for(db, [notifier], trusted=False)
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert fake_target.received() == []
    assert record["state"] == "dead"
    assert "untrusted" in record["last_error"]
    assert "${secrets.TOKEN}" in record["last_error"]


async def test_untrusted_run_without_secrets_sent(
    db: asyncpg.Pool, fake_target: FakeTarget
) -> None:
    await enqueue_for(db, [webhook(fake_target.url("/audit"))], trusted=False)
    await sender(db).drain_once()
    assert (await outbox(db))[0]["state"] == "sent"


async def test_missing_secret_dead(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    notifier = webhook(fake_target.url("/audit"), headers={"X-Key": "${secrets.NOPE}"})
    await enqueue_for(db, [notifier])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert record["state"] == "dead"
    assert "KUBECI_SECRET_NOPE" in record["last_error"]


async def test_missing_label_dead(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    notifier = webhook(fake_target.url("/audit"), body={"pr": "${pr.number}"})
    await enqueue_for(db, [notifier])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert record["state"] == "dead"
    assert "${pr.number}" in record["last_error"]


async def test_4xx_dead_without_exception(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script("/audit", Reply(400, "invalid_payload"))
    await enqueue_for(db, [webhook(fake_target.url("/audit"))])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert len(fake_target.received("/audit")) == 1
    assert record["state"] == "dead"
    assert "HTTP 400: invalid_payload" in record["last_error"]


async def test_nul_error_body_recorded(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script("/audit", Reply(400, b"bad\x00input"))
    await enqueue_for(db, [webhook(fake_target.url("/audit"))])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert len(fake_target.received("/audit")) == 1
    assert record["state"] == "dead"
    assert "HTTP 400: bad\ufffdinput" in record["last_error"]


async def test_5xx_retried_then_dead(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script("/audit", Reply(502, "bad gateway"))
    await enqueue_for(db, [webhook(fake_target.url("/audit"))])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert len(fake_target.received("/audit")) == 3
    assert record["state"] == "dead"
    assert record["last_error"].startswith("gave up after 3 attempts")


async def test_5xx_then_success(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script("/audit", Reply(503), Reply(200))
    await enqueue_for(db, [webhook(fake_target.url("/audit"))])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert record["state"] == "sent"
    assert record["attempts"] == 2


async def test_429_waits_for_retry_after(db: asyncpg.Pool, fake_target: FakeTarget) -> None:
    fake_target.script("/slack", Reply(429, "rate_limited", headers={"Retry-After": "30"}))
    await enqueue_for(db, [slack(fake_target.url("/slack"))])
    await sender(db).drain_once()
    async with db.acquire() as conn:
        due_in_s = await conn.fetchval(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM outbox"
        )
    assert len(fake_target.received("/slack")) == 1
    assert 25 < due_in_s <= 30


async def test_unreachable_target_retried(db: asyncpg.Pool) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await enqueue_for(db, [webhook(f"http://127.0.0.1:{port}/audit")])
    await sender(db).drain_once()
    record = (await outbox(db))[0]
    assert record["state"] == "dead"
    assert record["attempts"] == 3


def test_default_slack_text_for_task_attempt() -> None:
    payload = {
        "event": event(
            "attempt_failed", scope="task", step="test", task="unit", attempt=2, message="a <b>"
        ),
        "labels": {"repository": "acme/web", "sha": "abc1234def"},
        "run": {"id": 7, "url": "http://ci.test/runs/7?a=1&b=2"},
    }
    assert default_slack_text(payload) == (
        "kubeci: task unit (step test, job build) attempt 2 failed on acme/web@abc1234: a &lt;b&gt;"
        " — http://ci.test/runs/7?a=1&amp;b=2"
    )


def test_secret_store_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "TOKEN").write_text("from-file", encoding="utf-8")
    assert SecretStore({"TOKEN": "from-env"}, str(tmp_path)).get("TOKEN") == "from-env"


def test_secret_store_missing_names_setting(tmp_path: Path) -> None:
    with pytest.raises(SecretNotFound) as caught:
        SecretStore({}, str(tmp_path)).get("NOPE")
    assert "KUBECI_SECRET_NOPE" in str(caught.value)
    assert str(tmp_path / "NOPE") in str(caught.value)


@pytest.mark.parametrize("name", ["..", ".hidden", "sub/file"])
def test_secret_store_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    (tmp_path / ".hidden").write_text("x", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file").write_text("x", encoding="utf-8")
    with pytest.raises(SecretNotFound):
        SecretStore({}, str(tmp_path)).get(name)


def test_secret_store_masks_env_and_files(tmp_path: Path) -> None:
    (tmp_path / "FILE_KEY").write_text("file-value\n", encoding="utf-8")
    store = SecretStore({"ENV_KEY": "env-value"}, str(tmp_path))
    assert store.mask("a env-value b file-value c") == "a *** b *** c"


def test_secret_store_from_settings() -> None:
    store = SecretStore.from_settings(Settings.from_env({"KUBECI_SECRET_API": "v1"}))
    assert store.get("API") == "v1"
