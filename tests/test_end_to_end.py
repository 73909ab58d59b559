"""The whole service path: a signed delivery arrives, the pipeline at that commit runs,
and the forge shows pending then the final status on that commit, with a details URL
that returns 200, and one summary comment on the pull request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests import payloads as p
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.target import FakeTarget
from tests.harness import Harness, forge_settings, running_core

GITHUB_SECRET = "gh-e2e-secret"
GITLAB_SECRET = "gl-e2e-secret"
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
        f'            arguments: {{url: "{target.url("/unit")}", body: {{sha: "${{sha}}"}}}}\n'
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


async def deliver(service: Harness, forge: str, body: bytes, headers: dict[str, str]) -> int:
    """POST a delivery and return the id of the one run it started."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.base_url}/webhooks/{forge}", data=body, headers=headers) as reply,
    ):
        result: dict[str, Any] = await reply.json()
    assert reply.status == 200, result
    assert result["outcome"] == "started", result
    return int(result["runs"][0]["id"])


async def answers_ok(url: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return reply.status == 200


async def test_github_push_reports_statuses(
    service: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = p.github_request(
        p.github_push(after=p.SHA_B), "push", secret=GITHUB_SECRET, delivery=str(uuid.uuid4())
    )
    run_id = await deliver(service, "github", body, headers)
    assert await service.wait_run(run_id) == "succeeded"
    await service.wait_outbox()
    statuses = [s for s in fake_github.statuses if s["sha"] == p.SHA_B]
    assert [(s["context"], s["state"]) for s in statuses] == [
        ("kubeci/build", "pending"),
        ("kubeci/build", "success"),
    ]
    assert all(s["repo"] == GITHUB_REPO for s in statuses)
    assert statuses[-1]["target_url"] == service.engine.run_url(run_id)
    assert await answers_ok(statuses[-1]["target_url"])


async def test_github_pull_request_comment(
    service: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    body, headers = p.github_request(
        p.github_pull_request("opened", number=7, head_sha=p.SHA_C),
        "pull_request",
        secret=GITHUB_SECRET,
        delivery=str(uuid.uuid4()),
    )
    run_id = await deliver(service, "github", body, headers)
    assert await service.wait_run(run_id) == "succeeded"
    await service.wait_outbox()
    comments = fake_github.comments[(GITHUB_REPO, 7)]
    assert len(comments) == 1
    assert "build" in comments[0]["body"]
    assert "succeeded" in comments[0]["body"]
    assert service.engine.run_url(run_id) in comments[0]["body"]
    assert [s["state"] for s in fake_github.statuses if s["sha"] == p.SHA_C] == [
        "pending",
        "success",
    ]


async def test_gitlab_merge_request_reports(
    service: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    fake_gitlab.add_merge_request(GITLAB_PROJECT_ID, 3, sha=p.SHA_C)
    body, headers = p.gitlab_request(
        p.gitlab_merge_request("open", iid=3, last_commit=p.SHA_C),
        token=GITLAB_SECRET,
        extra_headers={"X-Gitlab-Event-UUID": str(uuid.uuid4())},
    )
    run_id = await deliver(service, "gitlab", body, headers)
    assert await service.wait_run(run_id) == "succeeded"
    await service.wait_outbox()
    statuses = [s for s in fake_gitlab.statuses if s["sha"] == p.SHA_C]
    assert [(s["name"], s["state"]) for s in statuses] == [
        ("kubeci/build", "running"),
        ("kubeci/build", "success"),
    ]
    assert await answers_ok(statuses[-1]["target_url"])
    notes = fake_gitlab.notes[(GITLAB_PROJECT_ID, 3)]
    assert len(notes) == 1
    assert "build" in notes[0]["body"]


async def test_invalid_pipeline_reports_config_status(
    service: Harness, fake_github: FakeGitHub
) -> None:
    broken = "jobs:\n  - name: build\n    steps:\n      - name: s\n        tasks: []\n"
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", broken)
    body, headers = p.github_request(
        p.github_push(after=p.SHA_B), "push", secret=GITHUB_SECRET, delivery=str(uuid.uuid4())
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.base_url}/webhooks/github", data=body, headers=headers) as reply,
    ):
        result = await reply.json()
    assert result["outcome"] == "invalid_pipeline"
    await service.wait_outbox()
    assert [(s["context"], s["state"]) for s in fake_github.statuses] == [
        ("kubeci/config", "failure")
    ]
    assert ".kubeci.yml:5" in fake_github.statuses[0]["description"]
