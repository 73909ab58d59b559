"""The webhook intake end to end: signed deliveries over HTTP to the served application,
real Postgres, the fake GitHub and GitLab serving `.kubeci.yml`, and a fake webhook
target that the pipelines' tasks call."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.config import Settings
from bot.forges.errors import ForgeServerError
from bot.intake.events import JSON_DEPTH_MAX, NewComment, Trigger
from bot.intake.service import TrustDecision, configuration_warnings
from bot.store.db import Connection
from pipelines_schema.problems import Problem
from tests import payloads as p
from tests.conftest import TABLES
from tests.fakes import Scripted
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.target import FakeTarget
from tests.harness import Harness, fast_settings, running_core

GITHUB_SECRET = "gh-webhook-secret"
GITLAB_SECRET = "gl-webhook-secret"
GITHUB_REPO = "octo-org/widgets"
GITLAB_PROJECT_ID = 42
GITLAB_REPO = "acme/widgets"


@dataclass
class ConfigErrors:
    """Records the calls of the intake's `on_config_error` callback."""

    calls: list[tuple[Trigger, list[Problem], str | None]] = field(default_factory=list)

    async def __call__(
        self, conn: Connection, trigger: Trigger, problems: list[Problem], run_url: str | None
    ) -> None:
        assert await conn.fetchval("SELECT count(*) FROM deliveries") == 1
        self.calls.append((trigger, problems, run_url))


@dataclass
class FixedTrust:
    decision: TrustDecision
    triggers: list[Trigger] = field(default_factory=list)

    async def decide(self, trigger: Trigger) -> TrustDecision:
        self.triggers.append(trigger)
        return self.decision


class BrokenTrust:
    """A trust policy with a bug: it raises an error the intake does not expect."""

    async def decide(self, trigger: Trigger) -> TrustDecision:
        raise KeyError(trigger.author)


class UnreachableForgeHandler:
    async def handle_comment(self, comment: NewComment, delivery_pk: int) -> dict[str, Any]:
        raise ForgeServerError("GitHub comment read failed with 502", forge="github", status=502)


@dataclass
class CommentRecorder:
    received: list[tuple[NewComment, int]] = field(default_factory=list)

    async def handle_comment(self, comment: NewComment, delivery_pk: int) -> dict[str, Any]:
        self.received.append((comment, delivery_pk))
        return {"commands": ["retest"]}


def pipeline(target: FakeTarget, *, mode: str = "sync", rules: str = "") -> str:
    """A one-task pipeline whose task POSTs the run's SHA and ref to the target."""
    return (
        "jobs:\n"
        "  - name: build\n"
        f"{rules}"
        "    steps:\n"
        "      - name: test\n"
        "        tasks:\n"
        "          - name: unit\n"
        "            action: webhook\n"
        "            timeout_s: 60\n"
        "            arguments:\n"
        f'              url: "{target.url("/unit")}"\n'
        f"              mode: {mode}\n"
        '              body: {sha: "${sha}", ref: "${ref}"}\n'
    )


@pytest.fixture
def config_errors() -> ConfigErrors:
    return ConfigErrors()


@pytest.fixture
async def core(
    db: asyncpg.Pool,
    database_dsn: str,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
    config_errors: ConfigErrors,
) -> AsyncIterator[Harness]:
    fake_gitlab.add_project(GITLAB_PROJECT_ID, GITLAB_REPO)
    settings = fast_settings(
        database_dsn,
        github_api_url=fake_github.url,
        github_token="ghp-test-token",
        github_webhook_secret=GITHUB_SECRET,
        gitlab_url=fake_gitlab.url,
        gitlab_token="glpat-test-token",
        gitlab_webhook_secret=GITLAB_SECRET,
        gitlab_timeout_s=2.0,
    )
    async with running_core(db, settings, on_config_error=config_errors) as harness:
        yield harness


async def post(
    core: Harness, forge: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    url = f"{core.base_url}/webhooks/{forge}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def github_delivery(
    payload: dict[str, Any], event: str, *, delivery: str | None = None, secret: str = GITHUB_SECRET
) -> tuple[bytes, dict[str, str]]:
    return p.github_request(payload, event, secret=secret, delivery=delivery or str(uuid.uuid4()))


def gitlab_delivery(
    payload: dict[str, Any], *, delivery: str | None = None, token: str = GITLAB_SECRET
) -> tuple[bytes, dict[str, str]]:
    extra = {"X-Gitlab-Event-UUID": delivery or str(uuid.uuid4())}
    return p.gitlab_request(payload, token=token, extra_headers=extra)


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    counts = {}
    for table in TABLES.split(", "):
        counts[table] = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return counts


async def run_row(core: Harness, run_id: int) -> asyncpg.Record:
    row = await core.pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert row is not None
    return row


async def delivery_row(core: Harness, delivery_id: str) -> asyncpg.Record:
    row = await core.pool.fetchrow("SELECT * FROM deliveries WHERE delivery_id = $1", delivery_id)
    assert row is not None, f"no delivery row {delivery_id}"
    return row


async def wait_attempt_waiting(core: Harness, run_id: int) -> None:
    """Wait until the run's async webhook task is parked, waiting for its callback."""
    async with asyncio.timeout(10):
        while not await core.pool.fetchval(
            "SELECT count(*) FROM attempts a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.run_id = $1 AND a.state = 'waiting'",
            run_id,
        ):
            await asyncio.sleep(0.05)


# Starting runs


async def test_github_push_run_completes(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = github_delivery(p.github_push(after=p.SHA_B), "push", delivery="d-1")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "started"
    assert result["delivery_id"] == "d-1"
    assert result["event"] == "push"
    run_id = result["runs"][0]["id"]
    assert result["runs"][0]["url"] == core.engine.run_url(run_id)
    assert await core.wait_run(run_id) == "succeeded"
    assert fake_target.received("/unit")[0].json() == {"sha": p.SHA_B, "ref": "refs/heads/main"}
    run = await run_row(core, run_id)
    assert run["labels"]["branch"] == "main"
    assert run["labels"]["event"] == "push"
    assert run["sha"] == p.SHA_B
    delivery = await delivery_row(core, "d-1")
    assert delivery["outcome"] == "started"
    assert run["delivery_pk"] == delivery["id"]


async def test_gitlab_push_run_completes(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = gitlab_delivery(p.gitlab_push(after=p.SHA_B), delivery="g-1")
    status, result = await post(core, "gitlab", body, headers)
    assert status == 200
    assert result["outcome"] == "started"
    assert result["event"] == "Push Hook"
    run_id = result["runs"][0]["id"]
    assert await core.wait_run(run_id) == "succeeded"
    assert fake_target.received("/unit")[0].json() == {"sha": p.SHA_B, "ref": "refs/heads/main"}
    run = await run_row(core, run_id)
    assert run["labels"]["branch"] == "main"
    assert run["labels"]["forge"] == "gitlab"
    assert run["repository"] == GITLAB_REPO
    assert run["source"]["project_id"] == GITLAB_PROJECT_ID


async def test_github_pull_request_labels(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    payload = p.github_pull_request("opened", labels=("ready",), installation_id=55)
    status, result = await post(core, "github", *github_delivery(payload, "pull_request"))
    assert status == 200
    assert result["action"] == "opened"
    run_id = result["runs"][0]["id"]
    assert await core.wait_run(run_id) == "succeeded"
    run = await run_row(core, run_id)
    labels = run["labels"]
    assert labels["event"] == "pull_request"
    assert labels["pr.number"] == "7"
    assert labels["pr.source_branch"] == "feature"
    assert labels["pr.target_branch"] == "main"
    assert labels["pr.labels"] == ["ready"]
    assert "branch" not in labels
    assert run["pr_number"] == 7
    assert run["ref"] == "refs/pull/7/head"
    assert run["source"]["installation_id"] == 55


async def test_gitlab_merge_request_labels(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    payload = p.gitlab_merge_request("open", labels=("ready",))
    status, result = await post(core, "gitlab", *gitlab_delivery(payload))
    assert status == 200
    run_id = result["runs"][0]["id"]
    assert await core.wait_run(run_id) == "succeeded"
    labels = (await run_row(core, run_id))["labels"]
    assert labels["event"] == "pull_request"
    assert labels["pr.number"] == "3"
    assert labels["pr.labels"] == ["ready"]
    assert "branch" not in labels


async def test_tag_push_has_tag_label(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    payload = p.github_push("refs/tags/v1.2.0", before=p.ZERO, after=p.SHA_B)
    status, result = await post(core, "github", *github_delivery(payload, "push"))
    assert status == 200
    run_id = result["runs"][0]["id"]
    assert await core.wait_run(run_id) == "succeeded"
    labels = (await run_row(core, run_id))["labels"]
    assert labels["tag"] == "v1.2.0"
    assert labels["event"] == "tag"
    assert "branch" not in labels


@pytest.mark.parametrize("forge", ["github", "gitlab"])
async def test_unicode_branch_end_to_end(
    core: Harness,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
    fake_target: FakeTarget,
    forge: str,
) -> None:
    branch = "fönster/☃-测试"
    ref = f"refs/heads/{branch}"
    if forge == "github":
        fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        body, headers = github_delivery(p.github_push(ref, after=p.SHA_B), "push")
    else:
        fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        body, headers = gitlab_delivery(p.gitlab_push(ref, after=p.SHA_B))
    status, result = await post(core, forge, body, headers)
    assert status == 200
    run_id = result["runs"][0]["id"]
    assert await core.wait_run(run_id) == "succeeded"
    assert (await run_row(core, run_id))["labels"]["branch"] == branch
    assert fake_target.received("/unit")[0].json()["ref"] == ref


async def test_yaml_extension_fallback(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yaml", pipeline(fake_target))
    status, result = await post(core, "github", *github_delivery(p.github_push(), "push"))
    assert status == 200
    assert result["outcome"] == "started"


async def test_no_matching_jobs_creates_no_run(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    rules = "    rules: {label: branch, exact: release}\n"
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target, rules=rules))
    body, headers = github_delivery(p.github_push(), "push", delivery="d-nomatch")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "no_matching_jobs"
    assert "build" in result["reason"]
    assert result["runs"] == []
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 0
    assert (await delivery_row(core, "d-nomatch"))["outcome"] == "no_matching_jobs"


# Duplicates


@pytest.mark.parametrize("forge", ["github", "gitlab"])
async def test_duplicate_delivery_one_run(
    core: Harness,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
    fake_target: FakeTarget,
    forge: str,
) -> None:
    if forge == "github":
        fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        body, headers = github_delivery(p.github_push(), "push", delivery="same")
    else:
        fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        body, headers = gitlab_delivery(p.gitlab_push(), delivery="same")
    first_status, first = await post(core, forge, body, headers)
    second_status, second = await post(core, forge, body, headers)
    assert first_status == 200
    assert first["outcome"] == "started"
    assert second_status == 200
    assert second["outcome"] == "duplicate"
    assert second["runs"] == []
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 1
    assert await core.pool.fetchval("SELECT count(*) FROM deliveries") == 1


async def test_concurrent_duplicates_one_run(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = github_delivery(p.github_push(), "push", delivery="twice-at-once")
    results = await asyncio.gather(*(post(core, "github", body, headers) for _ in range(4)))
    outcomes = sorted(result["outcome"] for _, result in results)
    assert outcomes == ["duplicate", "duplicate", "duplicate", "started"]
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 1


async def test_gitlab_delivery_without_uuid_dedupes_by_body(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = p.gitlab_request(p.gitlab_push(), token=GITLAB_SECRET)
    await post(core, "gitlab", body, headers)
    _, second = await post(core, "gitlab", body, headers)
    assert second["outcome"] == "duplicate"
    assert second["delivery_id"].startswith("sha256:")


# Rejected requests


@pytest.mark.parametrize("forge", ["github", "gitlab"])
async def test_wrong_secret_401_stores_nothing(core: Harness, forge: str) -> None:
    if forge == "github":
        body, headers = github_delivery(p.github_push(), "push", secret="wrong")
    else:
        body, headers = gitlab_delivery(p.gitlab_push(), token="wrong")
    status, result = await post(core, forge, body, headers)
    assert status == 401
    assert result["outcome"] == "unauthorized"
    assert "does not match" in result["error"]
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_missing_signature_401(core: Harness) -> None:
    body, headers = p.github_request(p.github_push(), "push")
    status, result = await post(core, "github", body, headers)
    assert status == 401
    assert "X-Hub-Signature-256 is missing" in result["error"]
    assert set((await row_counts(core.pool)).values()) == {0}


@pytest.mark.parametrize(
    ("forge", "variable"),
    [("github", "KUBECI_GITHUB_WEBHOOK_SECRET"), ("gitlab", "KUBECI_GITLAB_WEBHOOK_SECRET")],
)
async def test_secret_not_configured_401(
    db: asyncpg.Pool, database_dsn: str, forge: str, variable: str
) -> None:
    async with running_core(db, fast_settings(database_dsn), start_worker=False) as core:
        if forge == "github":
            body, headers = github_delivery(p.github_push(), "push")
        else:
            body, headers = gitlab_delivery(p.gitlab_push())
        status, result = await post(core, forge, body, headers)
    assert status == 401
    assert result["outcome"] == "secret_not_configured"
    assert variable in result["error"]
    assert set((await row_counts(db)).values()) == {0}


async def test_oversized_body_413(core: Harness) -> None:
    body = b"{" + b" " * (30 * 1024 * 1024) + b"}"
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push"}
    headers["X-Hub-Signature-256"] = p.sign_github(body, GITHUB_SECRET)
    status, result = await post(core, "github", body, headers)
    assert status == 413
    assert result["outcome"] == "too_large"
    assert str(25 * 1024 * 1024) in result["error"]
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_chunked_body_over_limit_413(db: asyncpg.Pool, database_dsn: str) -> None:
    settings = fast_settings(database_dsn, github_webhook_secret="x", max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    async with (
        running_core(db, settings, start_worker=False) as core,
        aiohttp.ClientSession() as session,
        session.post(f"{core.base_url}/webhooks/github", data=chunks()) as response,
    ):
        status = response.status
        result = await response.json()
    assert status == 413
    assert result["outcome"] == "too_large"


async def test_malformed_json_400_stores_nothing(core: Harness) -> None:
    body = b'{"ref": "refs/heads/main", '
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "bad-json",
        "X-Hub-Signature-256": p.sign_github(body, GITHUB_SECRET),
    }
    status, result = await post(core, "github", body, headers)
    assert status == 400
    assert result["outcome"] == "invalid_payload"
    assert result["field"] == "body"
    assert result["delivery_id"] == "bad-json"
    assert set((await row_counts(core.pool)).values()) == {0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "body"),
        (b"\xff\xfe", "body"),
        (b'{"object_kind": 7}', "object_kind"),
        (b'{"object_kind": "push", "ref": "refs/heads/x"}', "after"),
        (b'{"object_kind": "merge_request", "object_attributes": []}', "object_attributes"),
    ],
)
async def test_gitlab_bad_bodies_400(core: Harness, body: bytes, field: str) -> None:
    headers = {"Content-Type": "application/json", "X-Gitlab-Token": GITLAB_SECRET}
    status, result = await post(core, "gitlab", body, headers)
    assert status == 400
    assert result["field"] == field
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_missing_field_400_names_it(core: Harness) -> None:
    payload = p.github_push()
    del payload["after"]
    status, result = await post(core, "github", *github_delivery(payload, "push"))
    assert status == 400
    assert result["field"] == "after"
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_push_sha_not_commit_id_400(core: Harness, fake_github: FakeGitHub) -> None:
    payload = p.github_push(after="refs/heads/main")
    status, result = await post(core, "github", *github_delivery(payload, "push"))
    assert status == 400
    assert result["field"] == "after"
    assert "40 or 64 hexadecimal characters" in result["error"]
    assert fake_github.requests == []
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_push_ref_long_400(core: Harness) -> None:
    # Random text does not compress, so without the limit the ref overflows an index.
    payload = p.github_push(ref="refs/heads/" + secrets.token_hex(1500))
    status, result = await post(core, "github", *github_delivery(payload, "push"))
    assert status == 400
    assert result["field"] == "ref"
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_wrong_method_405(core: Harness) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{core.base_url}/webhooks/github") as response,
    ):
        assert response.status == 405


# Pipeline files


async def test_missing_pipeline_file_no_pipeline(core: Harness, fake_github: FakeGitHub) -> None:
    body, headers = github_delivery(p.github_push(), "push", delivery="d-none")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "no_pipeline"
    assert p.SHA_B in result["reason"]
    assert result["runs"] == []
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 0
    assert (await delivery_row(core, "d-none"))["outcome"] == "no_pipeline"
    assert fake_github.statuses == []
    assert len(fake_github.requests_to("contents.get")) == 2


async def test_invalid_pipeline_reports_all_problems(
    core: Harness, fake_github: FakeGitHub, config_errors: ConfigErrors
) -> None:
    text = "jobs:\n  - name: Build!\n    steps: []\n    colour: red\n"
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", text)
    body, headers = github_delivery(p.github_push(), "push", delivery="d-invalid")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "invalid_pipeline"
    assert len(config_errors.calls) == 1
    trigger, problems, run_url = config_errors.calls[0]
    assert trigger.sha == p.SHA_B
    assert len(problems) >= 2
    assert run_url is None
    assert len(result["problems"]) == len(problems)
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 0
    assert (await delivery_row(core, "d-invalid"))["outcome"] == "invalid_pipeline"


@pytest.mark.parametrize("forge", ["github", "gitlab"])
async def test_forge_503_then_redelivery(
    core: Harness,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
    fake_target: FakeTarget,
    forge: str,
) -> None:
    if forge == "github":
        fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        fake_github.script("contents.get", Scripted(503))
        body, headers = github_delivery(p.github_push(), "push", delivery="retry-me")
    else:
        fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
        fake_gitlab.script("files.raw", Scripted(503))
        body, headers = gitlab_delivery(p.gitlab_push(), delivery="retry-me")
    status, result = await post(core, forge, body, headers)
    assert status == 503
    assert result["outcome"] == "forge_unavailable"
    assert "503" in result["error"]
    assert set((await row_counts(core.pool)).values()) == {0}
    status, result = await post(core, forge, body, headers)
    assert status == 200
    assert result["outcome"] == "started"


async def test_slow_forge_503(core: Harness, fake_github: FakeGitHub) -> None:
    core.intake.forge_budget_s = 0.2
    fake_github.script("contents.get", Scripted(delay_s=1.0))
    status, result = await post(core, "github", *github_delivery(p.github_push(), "push"))
    assert status == 503
    assert "took longer than 0.2 s" in result["error"]
    assert set((await row_counts(core.pool)).values()) == {0}


async def test_forge_without_credentials_503(db: asyncpg.Pool, database_dsn: str) -> None:
    settings = fast_settings(database_dsn, github_webhook_secret=GITHUB_SECRET)
    async with running_core(db, settings, start_worker=False) as core:
        status, result = await post(core, "github", *github_delivery(p.github_push(), "push"))
    assert status == 503
    assert "KUBECI_GITHUB_TOKEN" in result["error"]


# Trust decisions


async def test_untrusted_awaits_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    policy = FixedTrust(TrustDecision(run=False, trusted=False, reason="fork: needs /ok-to-test"))
    core.intake.trust_policy = policy
    fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    payload = p.github_pull_request("opened")
    body, headers = github_delivery(payload, "pull_request", delivery="d-fork")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "awaiting_approval"
    assert result["reason"] == "fork: needs /ok-to-test"
    assert policy.triggers[0].pr_number == 7
    assert await core.pool.fetchval("SELECT count(*) FROM runs") == 0
    delivery = await delivery_row(core, "d-fork")
    assert delivery["payload"]["pull_request"]["number"] == 7


async def test_untrusted_run_marked(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    core.intake.trust_policy = FixedTrust(TrustDecision(run=True, trusted=False, reason="fork"))
    fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", pipeline(fake_target))
    status, result = await post(
        core, "github", *github_delivery(p.github_pull_request("opened"), "pull_request")
    )
    assert status == 200
    assert (await run_row(core, result["runs"][0]["id"]))["trusted"] is False


async def test_unexpected_error_500_stores_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    core.intake.trust_policy = BrokenTrust()
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    body, headers = github_delivery(p.github_push(), "push", delivery="d-bug")
    status, result = await post(core, "github", body, headers)
    assert status == 500
    assert result["outcome"] == "internal_error"
    assert result["delivery_id"] == "d-bug"
    assert set((await row_counts(core.pool)).values()) == {0}
    core.intake.trust_policy = FixedTrust(TrustDecision(run=True, trusted=True))
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "started"


# Cancelling and superseding


async def start_push(
    core: Harness, fake_github: FakeGitHub, target: FakeTarget, ref: str, sha: str
) -> int:
    fake_github.add_file(GITHUB_REPO, sha, ".kubeci.yml", pipeline(target, mode="async"))
    body, headers = github_delivery(p.github_push(ref, after=sha), "push")
    status, result = await post(core, "github", body, headers)
    assert status == 200, result
    run_id = int(result["runs"][0]["id"])
    await wait_attempt_waiting(core, run_id)
    return run_id


async def test_branch_deletion_cancels_its_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    feature_run = await start_push(core, fake_github, fake_target, "refs/heads/feature", p.SHA_B)
    main_run = await start_push(core, fake_github, fake_target, "refs/heads/main", p.SHA_C)
    payload = p.github_push("refs/heads/feature", before=p.SHA_B, after=p.ZERO)
    body, headers = github_delivery(payload, "push", delivery="d-delete")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "cancelled"
    assert result["cancelled_runs"] == [feature_run]
    assert (await run_row(core, feature_run))["state"] == "cancelled"
    job = await core.state("jobs", feature_run, "build")
    assert job["message"] == "branch feature deleted"
    assert (await run_row(core, main_run))["state"] == "running"
    assert (await delivery_row(core, "d-delete"))["outcome"] == "cancelled"


async def test_deleting_unknown_branch_cancels_nothing(core: Harness) -> None:
    payload = p.github_push("refs/heads/gone", before=p.SHA_B, after=p.ZERO)
    status, result = await post(core, "github", *github_delivery(payload, "push"))
    assert status == 200
    assert result["outcome"] == "nothing_to_cancel"
    assert result["cancelled_runs"] == []


@pytest.mark.parametrize("forge", ["github", "gitlab"])
async def test_pr_close_cancels_its_runs(
    core: Harness,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
    fake_target: FakeTarget,
    forge: str,
) -> None:
    text = pipeline(fake_target, mode="async")
    if forge == "github":
        fake_github.add_file(GITHUB_REPO, p.SHA_C, ".kubeci.yml", text)
        opened = github_delivery(p.github_pull_request("opened"), "pull_request")
        closed = github_delivery(p.github_pull_request("closed", merged=True), "pull_request")
    else:
        fake_gitlab.add_file(GITLAB_PROJECT_ID, p.SHA_C, ".kubeci.yml", text)
        opened = gitlab_delivery(p.gitlab_merge_request("open"))
        closed = gitlab_delivery(p.gitlab_merge_request("merge"))
    _, result = await post(core, forge, *opened)
    run_id = result["runs"][0]["id"]
    await wait_attempt_waiting(core, run_id)
    status, result = await post(core, forge, *closed)
    assert status == 200
    assert result["cancelled_runs"] == [run_id]
    assert (await run_row(core, run_id))["state"] == "cancelled"
    assert "merged" in (await core.state("jobs", run_id, "build"))["message"]


async def test_second_push_supersedes_first(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    first = await start_push(core, fake_github, fake_target, "refs/heads/main", p.SHA_B)
    second = await start_push(core, fake_github, fake_target, "refs/heads/main", p.SHA_C)
    job = await core.state("jobs", first, "build")
    assert job["state"] == "cancelled"
    assert job["superseded_by"] == p.SHA_C
    assert (await run_row(core, second))["state"] == "running"


async def test_push_to_other_branch_supersedes_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    first = await start_push(core, fake_github, fake_target, "refs/heads/main", p.SHA_B)
    await start_push(core, fake_github, fake_target, "refs/heads/other", p.SHA_C)
    assert (await core.state("jobs", first, "build"))["state"] == "running"


# Other events


async def test_ping_answers_pong(core: Harness) -> None:
    body, headers = github_delivery(p.github_ping(), "ping", delivery="d-ping")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "pong"
    assert (await delivery_row(core, "d-ping"))["outcome"] == "pong"


async def test_ignored_event_stored_with_reason(core: Harness) -> None:
    payload = p.github_pull_request("edited")
    body, headers = github_delivery(payload, "pull_request", delivery="d-edit")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "ignored"
    assert "no new commits" in result["reason"]
    delivery = await delivery_row(core, "d-edit")
    assert delivery["outcome"] == "ignored"
    assert delivery["reason"] == result["reason"]
    assert delivery["payload"] is None


async def test_comment_stored_without_handler(core: Harness) -> None:
    body, headers = github_delivery(p.github_issue_comment(), "issue_comment", delivery="d-c")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "comment_stored"
    delivery = await delivery_row(core, "d-c")
    assert delivery["payload"]["comment"]["body"] == "/retest"


async def test_comment_handed_to_handler(core: Harness) -> None:
    handler = CommentRecorder()
    core.intake.comment_handler = handler
    body, headers = gitlab_delivery(p.gitlab_note(body="/test all"), delivery="g-note")
    status, result = await post(core, "gitlab", body, headers)
    assert status == 200
    assert result["commands"] == ["retest"]
    comment, delivery_pk = handler.received[0]
    assert comment.body == "/test all"
    assert delivery_pk == (await delivery_row(core, "g-note"))["id"]


async def test_comment_handler_failure_keeps_comment(core: Harness) -> None:
    core.intake.comment_handler = UnreachableForgeHandler()
    body, headers = github_delivery(p.github_issue_comment(), "issue_comment", delivery="d-502")
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "comment_stored"
    assert "502" in result["error"]
    assert (await delivery_row(core, "d-502"))["outcome"] == "comment_stored"


async def test_comment_with_nul_stored(core: Harness) -> None:
    payload = p.github_issue_comment(body="/retest\x00 \ud800")
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "issue_comment",
        "X-GitHub-Delivery": "d-nul",
        "X-Hub-Signature-256": p.sign_github(body, GITHUB_SECRET),
    }
    status, result = await post(core, "github", body, headers)
    assert status == 200
    assert result["outcome"] == "comment_stored"
    assert (await delivery_row(core, "d-nul"))["payload"]["comment"]["body"].startswith("/retest")


async def test_comment_nested_at_limit_stored(core: Harness) -> None:
    payload = p.github_issue_comment()
    nested: dict[str, Any] = {}
    payload["extra"] = nested
    # The payload object and "extra" are two levels, so this reaches the limit exactly.
    for _ in range(JSON_DEPTH_MAX - 2):
        nested["inner"] = {}
        nested = nested["inner"]
    body, headers = github_delivery(payload, "issue_comment", delivery="d-deep")
    status, result = await post(core, "github", body, headers)
    assert status == 200, result
    assert (await delivery_row(core, "d-deep"))["outcome"] == "comment_stored"


async def test_deliveries_counted_in_metrics(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(GITHUB_REPO, p.SHA_B, ".kubeci.yml", pipeline(fake_target))
    await post(core, "github", *github_delivery(p.github_push(), "push"))
    await post(core, "github", *github_delivery(p.github_push(), "push", secret="wrong"))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{core.base_url}/metrics") as response,
    ):
        text = await response.text()
    started = 'kubeci_deliveries_total{event="push",forge="github",outcome="started"} 1.0'
    rejected = 'kubeci_deliveries_total{event="unknown",forge="github",outcome="unauthorized"} 1.0'
    assert started in text
    assert rejected in text


async def test_gitlab_unknown_event_counted_as_other(core: Harness) -> None:
    body, headers = gitlab_delivery(p.gitlab_push())
    headers["X-Gitlab-Event"] = "Made Up Hook"
    await post(core, "gitlab", body, headers)
    body, headers = gitlab_delivery({"object_kind": "made_up"})
    del headers["X-Gitlab-Event"]
    await post(core, "gitlab", body, headers)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{core.base_url}/metrics") as response,
    ):
        text = await response.text()
    assert "made" not in text.lower()
    other = 'kubeci_deliveries_total{event="other",forge="gitlab",outcome="ignored"} 1.0'
    assert other in text


# Start-up warnings


def test_warnings_none_without_forges() -> None:
    assert configuration_warnings(Settings()) == []


def test_warnings_none_when_complete() -> None:
    settings = Settings(
        github_webhook_secret="s",
        github_token="t",
        gitlab_webhook_secret="s",
        gitlab_token="t",
    )
    assert configuration_warnings(settings) == []


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"github_webhook_secret": "s"}, "KUBECI_GITHUB_TOKEN"),
        ({"gitlab_webhook_secret": "s"}, "KUBECI_GITLAB_TOKEN"),
        ({"github_token": "t"}, "KUBECI_GITHUB_WEBHOOK_SECRET"),
        ({"github_app_id": "1", "github_private_key_file": "k"}, "KUBECI_GITHUB_WEBHOOK_SECRET"),
        ({"gitlab_token": "t"}, "KUBECI_GITLAB_WEBHOOK_SECRET"),
    ],
)
def test_warnings_half_configured_forge(values: dict[str, str], variable: str) -> None:
    (warning,) = configuration_warnings(Settings(**values))
    assert variable in warning


def test_warnings_app_without_key() -> None:
    settings = Settings(github_webhook_secret="s", github_app_id="1")
    (warning,) = configuration_warnings(settings)
    assert "KUBECI_GITHUB_PRIVATE_KEY_FILE" in warning


def test_warnings_app_and_token() -> None:
    settings = Settings(
        github_webhook_secret="s", github_app_id="1", github_private_key_file="k", github_token="t"
    )
    (warning,) = configuration_warnings(settings)
    assert "ignores the token" in warning
