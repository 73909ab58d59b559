"""The webhook task action against a fake target on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from bot.actions.base import AttemptContext
from bot.actions.webhook import EXCERPT_MAX_BYTES, WebhookAction
from bot.config import Settings
from bot.net.http import TRUNCATION_MARKER, make_session
from tests.fakes.target import Callback, FakeTarget, Reply, StubResolver, guard_tripwire

SECRET = "hunter2-secret-value"


class Recorder:
    """Collects what the action hands back to the engine through the context."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []
        self.saved: list[dict[str, Any]] = []

    async def append_log(self, source: str, text: str) -> None:
        self.logs.append((source, text))

    async def save_data(self, data: dict[str, Any]) -> None:
        self.saved.append(data)


def make_ctx(recorder: Recorder, arguments: Mapping[str, Any], **overrides: Any) -> AttemptContext:
    values: dict[str, Any] = {
        "run_id": 7,
        "job_name": "build",
        "step_name": "test",
        "task_id": 11,
        "task_name": "lint",
        "attempt_id": 21,
        "attempt_number": 1,
        "idempotency_key": "run-7-task-11",
        "arguments": arguments,
        "labels": {"sha": "abc1234"},
        "timeout_s": 60.0,
        "remaining_s": 60.0,
        "callback_url": "http://127.0.0.1:9/callbacks/token-abc",
        "callback_token": "token-abc",
        "data": {},
        "recovered": False,
        "save_data": recorder.save_data,
        "append_log": recorder.append_log,
        "mask": lambda text: text.replace(SECRET, "***"),
    }
    values.update(overrides)
    return AttemptContext(**values)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def action() -> WebhookAction:
    return WebhookAction(Settings())


async def test_sync_success(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(200, "done"))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.outcome == "succeeded"
    assert result.response_status == 200
    assert result.response_excerpt == "done"


async def test_sync_sends_json_body(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    arguments = {"url": fake_target.url("/run"), "body": {"sha": "abc1234", "n": [1, 2]}}
    await action.execute(make_ctx(recorder, arguments))
    request = fake_target.received("/run")[0]
    assert request.method == "POST"
    assert request.json() == {"sha": "abc1234", "n": [1, 2]}
    assert request.headers["Content-Type"] == "application/json"


async def test_sync_sends_text_body_and_method(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    arguments = {"url": fake_target.url("/run"), "method": "put", "body": "plain words"}
    await action.execute(make_ctx(recorder, arguments))
    request = fake_target.received("/run")[0]
    assert request.method == "PUT"
    assert request.text == "plain words"
    assert request.headers["Content-Type"].startswith("text/plain")


async def test_headers_idempotency_and_user_agent(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    arguments = {
        "url": fake_target.url("/run"),
        "headers": {"Authorization": "Bearer t", "idempotency-key": "mine", "X-Count": 3},
    }
    await action.execute(make_ctx(recorder, arguments))
    await action.execute(make_ctx(recorder, arguments, attempt_id=22, attempt_number=2))
    first, second = fake_target.received("/run")
    assert first.headers.getall("Idempotency-Key") == ["run-7-task-11"]
    assert second.headers["Idempotency-Key"] == "run-7-task-11"
    assert first.headers["User-Agent"].startswith("KubeCI/")
    assert first.headers["Authorization"] == "Bearer t"
    assert first.headers["X-Count"] == "3"


async def test_sync_has_no_callback_header(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert "X-KubeCI-Callback-URL" not in fake_target.received("/run")[0].headers


async def test_4xx_not_retryable(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(404, "no such hook"))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert result.response_status == 404
    assert "HTTP 404" in result.message


async def test_5xx_retryable(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(503, "busy"))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.outcome == "failed"
    assert result.retryable is True
    assert result.retry_after_s is None


async def test_429_retry_after(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(429, "slow down", headers={"Retry-After": "7"}))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.retryable is True
    assert result.retry_after_s == 7.0


async def test_timeout_retryable(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/slow", Reply(200, delay_s=0.5))
    arguments = {"url": fake_target.url("/slow"), "request_timeout_s": 0.1}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "failed"
    assert result.retryable is True
    assert "0.1 s" in result.message


async def test_connection_refused_retryable(action: WebhookAction, recorder: Recorder) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await action.execute(make_ctx(recorder, {"url": f"http://127.0.0.1:{port}/run"}))
    assert result.outcome == "failed"
    assert result.retryable is True
    assert recorder.logs[-1][0] == "response"


async def test_success_status_accepts_listed(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(202))
    arguments = {"url": fake_target.url("/run"), "success_status": [200, 202]}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "succeeded"


async def test_success_status_rejects_unlisted_2xx(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(200))
    arguments = {"url": fake_target.url("/run"), "success_status": [202]}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert "expected 202" in result.message


async def test_success_status_may_include_5xx(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(500))
    arguments = {"url": fake_target.url("/run"), "success_status": [500]}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "succeeded"


async def test_async_parks_with_callback_header(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(202, "accepted"))
    ctx = make_ctx(
        recorder,
        {
            "url": fake_target.url("/run"),
            "mode": "async",
            "body": {"callback": "http://127.0.0.1:9/callbacks/token-abc"},
        },
    )
    result = await action.execute(ctx)
    request = fake_target.received("/run")[0]
    assert result.outcome == "parked"
    assert result.response_status == 202
    assert request.headers["X-KubeCI-Callback-URL"] == ctx.callback_url
    assert request.json() == {"callback": ctx.callback_url}


async def test_async_error_status_fails(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(400, "bad"))
    arguments = {"url": fake_target.url("/run"), "mode": "async"}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "failed"
    assert result.retryable is False


async def test_async_without_callback_url_fails(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    arguments = {"url": fake_target.url("/run"), "mode": "async"}
    result = await action.execute(make_ctx(recorder, arguments, callback_url=None))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert fake_target.received() == []


async def test_async_target_calls_back(
    action: WebhookAction,
    fake_target: FakeTarget,
    callback_receiver: FakeTarget,
    recorder: Recorder,
) -> None:
    callback = Callback(status="failed", message="lint errors", delay_s=0.05)
    fake_target.script("/run", Reply(202, callback=callback))
    callback_url = callback_receiver.url("/callbacks/token-abc")
    arguments = {"url": fake_target.url("/run"), "mode": "async"}
    result = await action.execute(make_ctx(recorder, arguments, callback_url=callback_url))
    sent = await fake_target.wait_for_callbacks(1)
    assert result.outcome == "parked"
    assert sent[0].status == 200
    assert callback_receiver.received("/callbacks/token-abc")[0].json() == {
        "status": "failed",
        "message": "lint errors",
    }


async def test_excerpt_bounded_at_4_kib(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(200, "é" * 50_000))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.response_excerpt is not None
    assert len(result.response_excerpt.encode("utf-8")) <= EXCERPT_MAX_BYTES
    assert result.response_excerpt.endswith(TRUNCATION_MARKER)
    assert "\ufffd" not in result.response_excerpt


async def test_nul_in_body_replaced_in_excerpt(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(200, b"\x89PNG\x00\x00"))
    result = await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    assert result.outcome == "succeeded"
    assert result.response_excerpt == "\ufffdPNG\ufffd\ufffd"


async def test_secret_masked_in_excerpt_and_log(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(401, f"bad token {SECRET}"))
    arguments = {"url": fake_target.url(f"/run?token={SECRET}")}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.response_excerpt == "bad token ***"
    assert SECRET not in result.message
    assert all(SECRET not in text for _, text in recorder.logs)


async def test_echoed_callback_url_hidden(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    body = "url http://127.0.0.1:9/callbacks/token-abc token token-abc json token-abc"
    fake_target.script("/run", Reply(202, body))
    arguments = {"url": fake_target.url("/run"), "mode": "async"}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "parked"
    assert result.response_excerpt == "url *** token *** json ***"


async def test_callback_token_hidden_in_url_and_log(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    fake_target.script("/run", Reply(500, "failed"))
    arguments = {"url": fake_target.url("/run?cb=token-abc"), "mode": "async"}
    result = await action.execute(make_ctx(recorder, arguments))
    assert "token-abc" not in result.message
    assert all("token-abc" not in text for _, text in recorder.logs)
    assert "cb=***" in result.message


async def test_callback_token_hidden_in_failure(action: WebhookAction, recorder: Recorder) -> None:
    arguments = {"url": "http://127.0.0.1:1/run?cb=token-abc", "connect_timeout_s": 1}
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "failed"
    assert "token-abc" not in result.message
    assert all("token-abc" not in text for _, text in recorder.logs)


async def test_response_log_line(
    action: WebhookAction, fake_target: FakeTarget, recorder: Recorder
) -> None:
    await action.execute(make_ctx(recorder, {"url": fake_target.url("/run")}))
    source, text = recorder.logs[0]
    assert source == "response"
    assert "HTTP 200" in text


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"url": "ftp://example.test/x"}, "ftp://example.test/x"),
        ({"url": "http://127.0.0.1/x", "mode": "later"}, "later"),
        ({"url": "http://127.0.0.1/x", "method": "FETCH"}, "FETCH"),
        ({"url": "http://127.0.0.1/x", "success_status": ["ok"]}, "ok"),
        ({"url": "http://127.0.0.1/x", "request_timeout_s": 0}, "request_timeout_s"),
        ({"url": "http://127.0.0.1/x", "headers": {"X-A": "a\r\nX-B: b"}}, "X-A"),
    ],
)
async def test_invalid_arguments_not_retryable(
    action: WebhookAction, recorder: Recorder, arguments: dict[str, Any], named: str
) -> None:
    result = await action.execute(make_ctx(recorder, arguments))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert named in result.message


async def test_metadata_target_not_retryable(recorder: Recorder) -> None:
    stub = StubResolver({"hooks.test": ["169.254.169.254"]})

    def session_factory() -> aiohttp.ClientSession:
        return make_session(Settings(), resolver=stub, trace_configs=[guard_tripwire(stub)])

    action = WebhookAction(Settings(), session_factory)
    result = await action.execute(make_ctx(recorder, {"url": "http://hooks.test/run"}))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert "KUBECI_OUTBOUND_ALLOW" in result.message
