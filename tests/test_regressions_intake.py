"""Regressions found by attacking the webhook intake, the run page, metrics and the
forge reports through the running service.

Tests marked `xfail(strict=True)` describe behaviour that is still wrong: each passes
once the bug is fixed, and then its marker must go.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.reporting.summary import MARKER
from tests import payloads as p
from tests.fakes import Scripted
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.target import FakeTarget
from tests.harness import Harness, forge_settings, running_core

GITHUB_SECRET = "gh-regression-secret"
GITLAB_SECRET = "gl-regression-secret"
GITHUB_REPO = "octo-org/widgets"
GITLAB_PROJECT_ID = 42
GITLAB_REPO = "acme/widgets"


def pipeline(target: FakeTarget) -> str:
    return (
        "jobs:\n"
        "  - name: build\n"
        "    steps:\n"
        "      - name: test\n"
        "        tasks:\n"
        "          - name: unit\n"
        "            action: webhook\n"
        f'            arguments: {{url: "{target.url("/unit")}"}}\n'
    )


@pytest.fixture
async def service(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_gitlab: FakeGitLab
) -> AsyncIterator[Harness]:
    fake_gitlab.add_project(GITLAB_PROJECT_ID, GITLAB_REPO)
    settings = forge_settings(
        database_dsn,
        fake_github.url,
        fake_gitlab.url,
        github_secret=GITHUB_SECRET,
        gitlab_secret=GITLAB_SECRET,
    )
    async with running_core(db, settings, reporting=True) as harness:
        yield harness


async def post(
    service: Harness, forge: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.base_url}/webhooks/{forge}", data=body, headers=headers) as reply,
    ):
        text = await reply.text()
    try:
        return reply.status, json.loads(text)
    except ValueError:
        return reply.status, text


async def get_status(service: Harness, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(service.base_url + path) as reply:
        await reply.read()
        return reply.status


def signed_ping(body: bytes, event: str = "ping") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": p.sign_github(body, GITHUB_SECRET),
    }


async def raw_post(service: Harness, path: str, header_lines: bytes, body: bytes) -> bytes:
    """Send a request whose header bytes are not UTF-8, which aiohttp's client cannot do."""
    port = int(service.base_url.rsplit(":", 1)[1])
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + header_lines
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


# Fixed


async def test_metrics_event_header_not_utf8(service: Harness) -> None:
    body = json.dumps(p.github_ping()).encode()
    headers = signed_ping(body)
    del headers["X-GitHub-Event"]
    lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers.items())
    await raw_post(service, "/webhooks/github", lines + b"X-GitHub-Event: \xff\xfe\r\n", body)
    assert await get_status(service, "/metrics") == 200


async def test_run_page_superscript_digit(service: Harness) -> None:
    assert await get_status(service, "/runs/%C2%B2") == 404


async def test_delivery_id_long(service: Harness) -> None:
    body = json.dumps(p.github_ping()).encode()
    headers = {**signed_ping(body), "X-GitHub-Delivery": secrets.token_hex(2500)}
    status, result = await post(service, "github", body, headers)
    assert status == 400
    assert result["field"] == "header X-GitHub-Delivery"


async def test_comment_nan_rejected(service: Harness) -> None:
    text = json.dumps(p.github_issue_comment(body="looks good"))
    body = text.replace('"action": "created"', '"action": "created", "score": NaN').encode()
    status, result = await post(service, "github", body, signed_ping(body, "issue_comment"))
    assert status == 400
    assert "contains NaN" in result["error"]


async def test_comment_huge_float_rejected(service: Harness) -> None:
    text = json.dumps(p.github_issue_comment(body="looks good"))
    body = text.replace('"action": "created"', '"action": "created", "score": 1e400').encode()
    status, result = await post(service, "github", body, signed_ping(body, "issue_comment"))
    assert status == 400
    assert "1e400" in result["error"]


async def test_body_nested_deep(service: Harness) -> None:
    body = b'{"zen":' * 100_000 + b"1" + b"}" * 100_000
    status, result = await post(service, "github", body, signed_ping(body))
    assert status == 400
    assert "deeper than" in result["error"]


async def test_body_integer_huge(service: Harness) -> None:
    body = b'{"zen": "x", "hook_id": 1' + b"0" * 4300 + b"}"
    status, result = await post(service, "github", body, signed_ping(body))
    assert status == 400
    assert "4301 digits" in result["error"]


async def test_push_repository_slashes(service: Harness) -> None:
    payload = p.github_push(repo=p.github_repo("octo-org/widgets"))
    payload["repository"]["full_name"] = "octo-org/widgets/extra"
    body = json.dumps(payload).encode()
    status, result = await post(service, "github", body, signed_ping(body, "push"))
    assert status == 400
    assert result["field"] == "repository.full_name"


async def test_push_repository_dot_segment(service: Harness, fake_github: FakeGitHub) -> None:
    payload = p.github_push(repo=p.github_repo("octo-org/widgets"))
    payload["repository"]["full_name"] = "octo-org/.."
    body = json.dumps(payload).encode()
    status, result = await post(service, "github", body, signed_ping(body, "push"))
    assert status == 400
    assert result["field"] == "repository.full_name"
    assert fake_github.requests == []


async def test_file_base64_invalid(service: Harness, fake_github: FakeGitHub) -> None:
    content = {"type": "file", "encoding": "base64", "content": "!!!notbase64"}
    fake_github.script("contents.get", Scripted(200, content))
    body = json.dumps(p.github_push()).encode()
    status, result = await post(service, "github", body, signed_ping(body, "push"))
    assert status == 503
    assert result["outcome"] == "forge_unavailable"
    assert "not valid base64" in result["error"]


async def test_github_summary_user_marker(
    service: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    user_text = f"{MARKER} quoting the bot"
    fake_github.add_comment(GITHUB_REPO, 7, user_text, author="carol")
    payload = p.github_pull_request("opened", number=7, head_sha=p.SHA_C)
    body = json.dumps(payload).encode()
    status, result = await post(service, "github", body, signed_ping(body, "pull_request"))
    assert status == 200, result
    await service.wait_run(result["runs"][0]["id"])
    await service.wait_outbox()
    assert fake_github.comments[(GITHUB_REPO.lower(), 7)][0]["body"] == user_text


async def test_gitlab_summary_user_marker(
    service: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    fake_gitlab.add_merge_request(GITLAB_PROJECT_ID, 3, sha=p.SHA_C)
    user_text = f"{MARKER} quoting the bot"
    note = fake_gitlab._note(user_text, {"id": 64, "username": "carol"}, 3)
    fake_gitlab.notes[(GITLAB_PROJECT_ID, 3)] = [note]
    body, headers = p.gitlab_request(
        p.gitlab_merge_request("open", iid=3, last_commit=p.SHA_C),
        token=GITLAB_SECRET,
        extra_headers={"X-Gitlab-Event-UUID": str(uuid.uuid4())},
    )
    status, result = await post(service, "gitlab", body, headers)
    assert status == 200, result
    await service.wait_run(result["runs"][0]["id"])
    await service.wait_outbox()
    assert fake_gitlab.notes[(GITLAB_PROJECT_ID, 3)][0]["body"] == user_text


async def test_gitlab_member_hook(service: Harness) -> None:
    payload = {
        "created_at": "2024-01-01T00:00:00Z",
        "group_name": "acme",
        "group_path": "acme",
        "group_id": 7,
        "user_username": "carol",
        "user_id": 64,
        "group_access": "Guest",
        "event_name": "user_add_to_group",
    }
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Member Hook",
        "X-Gitlab-Token": GITLAB_SECRET,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
    }
    status, result = await post(service, "gitlab", body, headers)
    assert status == 200
    assert result["outcome"] == "ignored"
    assert result["reason"] == "unsupported event Member Hook (user_add_to_group)"


async def test_metrics_event_names_bounded(service: Harness) -> None:
    body = json.dumps(p.github_ping()).encode()
    for index in range(5):
        await post(service, "github", body, signed_ping(body, f"made-up-{index}"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{service.base_url}/metrics") as reply,
    ):
        text = await reply.text()
    assert "made-up-" not in text
    assert 'kubeci_deliveries_total{event="other",forge="github",outcome="ignored"} 5.0' in text
