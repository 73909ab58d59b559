"""Forge reports end to end: engine events to outbox rows to the fake GitHub and GitLab.

Runs use a real engine, worker and webhook action against a fake target. The outbox
sender delivers through the real forge clients to the fake forges.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.config import Settings
from bot.forges.clients import ForgeClients
from bot.outbox import OutboxSender, RetryPolicy
from bot.reporting import (
    SUMMARY_MARKER,
    Reporter,
    enqueue_config_error,
    enqueue_reaction,
    enqueue_reply,
    enqueue_status,
    enqueue_summary_refresh,
    forge_sinks,
)
from bot.reporting.texts import code_block, tail
from pipelines_schema.loader import validate_text
from tests.fakes import Scripted
from tests.fakes.fixtures import RsaKeyPair
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.target import FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core

REPO = "octo-org/widgets"
PROJECT_ID = 42
PROJECT_PATH = "acme/widgets"
SHA = "a" * 40
NEWER_SHA = "b" * 40
PR = 5
MR = 3
APP_ID = "4242"
INSTALLATION = 31

PIPELINE = """
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: unit
            action: webhook
            backoff: {initial_s: 0.05, factor: 2, max_s: 0.2}
            arguments:
              url: "${labels.target}/unit"
"""

BROKEN_PIPELINE = """\
jobs:
  - name: Build
    stpes: []
  - name: test
    steps:
      - name: unit
        tasks:
          - name: run
            action: teleport
"""


@pytest.fixture(autouse=True)
async def no_config_errors(db: asyncpg.Pool) -> None:
    """Empty the config error table, which the shared database fixture does not."""
    await db.execute("TRUNCATE config_errors")


def forge_settings(
    database_dsn: str,
    github: FakeGitHub | None = None,
    gitlab: FakeGitLab | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {"gitlab_timeout_s": 5.0}
    if github is not None:
        values.update(github_api_url=github.url, github_token="ghp-test-token")
    if gitlab is not None:
        values.update(gitlab_url=gitlab.url, gitlab_token="glpat-test-token")
    values.update(overrides)
    return fast_settings(database_dsn, **values)


@contextlib.asynccontextmanager
async def reporting_core(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[Harness]:
    """A running core whose events are reported to the forges named in `settings`."""
    forges = ForgeClients(settings)
    try:
        async with running_core(
            pool,
            settings,
            hooks=[Reporter(settings).on_event],
            sinks=forge_sinks(pool, forges, settings),
        ) as harness:
            yield harness
    finally:
        await forges.close()


@pytest.fixture
def gitlab_project(fake_gitlab: FakeGitLab) -> FakeGitLab:
    fake_gitlab.add_project(PROJECT_ID, PROJECT_PATH)
    fake_gitlab.add_merge_request(PROJECT_ID, MR, sha=SHA)
    return fake_gitlab


def labels(target: FakeTarget) -> dict[str, str]:
    return {"target": target.base_url, "event": "pull_request"}


def github_run(sha: str = SHA, **extra: Any) -> dict[str, Any]:
    return {
        "forge": "github",
        "repository": REPO,
        "sha": sha,
        "ref": f"refs/pull/{PR}/head",
        "pr_number": PR,
        "group_base": f"github:{REPO}#pr:{PR}",
        **extra,
    }


def gitlab_run(sha: str = SHA) -> dict[str, Any]:
    return {
        "forge": "gitlab",
        "repository": PROJECT_PATH,
        "sha": sha,
        "ref": f"refs/merge-requests/{MR}/head",
        "pr_number": MR,
        "source": {"project_id": PROJECT_ID},
        "group_base": f"gitlab:{PROJECT_PATH}!{MR}",
    }


def states(statuses: list[dict[str, Any]], sha: str = SHA) -> list[tuple[str, str]]:
    """(context, state) of the statuses set on `sha`, in the order the fake accepted them."""
    return [
        (status.get("context") or status.get("name") or "", status["state"])
        for status in statuses
        if status["sha"] == sha
    ]


async def http_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


async def run_to_end(core: Harness, target: FakeTarget, **request: Any) -> int:
    run_id = await core.start_run(PIPELINE, labels(target), **request)
    await core.wait_run(run_id)
    await core.wait_outbox()
    return run_id


def drain_sender(
    pool: asyncpg.Pool, settings: Settings, forges: ForgeClients, *, retry_s: float = 0.0
) -> OutboxSender:
    """A sender for `drain_once`; failed rows wait `retry_s` before their next attempt."""
    retry = RetryPolicy(max_attempts=3, initial_s=retry_s, factor=1.0, max_s=retry_s)
    return OutboxSender(pool, forge_sinks(pool, forges, settings), "drain", retry=retry)


async def gitlab_status(conn: Any, state: Any, description: str) -> None:
    await enqueue_status(
        conn,
        forge="gitlab",
        repository=PROJECT_PATH,
        sha=SHA,
        context="kubeci/build",
        state=state,
        description=description,
        target_url=None,
        source={"project_id": PROJECT_ID},
    )


@dataclass(frozen=True)
class FakeTrigger:
    forge: str
    repository: str
    sha: str
    pr_number: int | None
    routing: dict[str, Any] = field(default_factory=dict)

    def source(self) -> dict[str, Any]:
        return dict(self.routing)


# Commit statuses


async def test_github_status_pending_then_success(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        run_id = await run_to_end(core, fake_target, **github_run())
        run_url = core.engine.run_url(run_id)
        assert states(fake_github.statuses) == [
            ("kubeci/build", "pending"),
            ("kubeci/build", "success"),
        ]
        assert [status["target_url"] for status in fake_github.statuses] == [run_url, run_url]
        assert fake_github.statuses[1]["description"].startswith("succeeded in ")
        assert await http_status(fake_github.statuses[1]["target_url"]) == 200


async def test_gitlab_status_running_then_success(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with reporting_core(db, settings) as core:
        run_id = await run_to_end(core, fake_target, **gitlab_run())
        assert states(gitlab_project.statuses) == [
            ("kubeci/build", "running"),
            ("kubeci/build", "success"),
        ]
        target_url = gitlab_project.statuses[-1]["target_url"]
        assert target_url == core.engine.run_url(run_id)
        assert await http_status(target_url) == 200


async def test_failed_status_names_task(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/unit", Reply(status=400, body="bad request " * 40))
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    final = fake_github.statuses[-1]
    assert final["state"] == "failure"
    assert final["description"].startswith("failed in test/unit: ")
    assert "HTTP 400" in final["description"]
    assert len(final["description"]) <= 140


async def test_manual_run_reports_nothing(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, forge="manual", repository=REPO, sha=SHA)
    assert fake_github.requests == []
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


@pytest.mark.parametrize("limit", ["429", "secondary", "primary"])
async def test_rate_limited_status_retried_in_order(
    db: asyncpg.Pool,
    database_dsn: str,
    fake_github: FakeGitHub,
    fake_target: FakeTarget,
    limit: str,
) -> None:
    if limit == "429":
        rejection = Scripted(429, {"message": "Too many requests"}, {"Retry-After": "1"})
        fake_github.script("statuses.create", rejection)
    elif limit == "secondary":
        fake_github.secondary_limit("statuses.create", retry_after_s=1)
    else:
        fake_github.primary_limit("statuses.create", reset_in_s=1)
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    assert states(fake_github.statuses) == [
        ("kubeci/build", "pending"),
        ("kubeci/build", "success"),
    ]
    assert len(fake_github.requests_to("statuses.create")) == 3
    if limit != "primary":
        # The retry waited for the Retry-After header (1 s).
        waited_s = await db.fetchval(
            "SELECT extract(epoch FROM sent_at - created_at)::float8 FROM outbox"
            " WHERE kind = 'github.status' ORDER BY id LIMIT 1"
        )
        assert waited_s >= 1.0


async def test_rejected_status_dead_run_unaffected(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.script("statuses.create", Scripted(422, {"message": "Validation Failed"}))
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        run_id = await run_to_end(core, fake_target, **github_run())
        assert await core.wait_run(run_id) == "succeeded"
    dead = await db.fetchrow("SELECT * FROM outbox WHERE state = 'dead'")
    assert dead is not None
    assert dead["kind"] == "github.status"
    assert dead["attempts"] == 1
    assert "422" in dead["last_error"]
    assert states(fake_github.statuses) == [("kubeci/build", "success")]


async def test_bad_credentials_retried_then_dead(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github, github_token="ghp-revoked")
    async with reporting_core(db, settings) as core:
        run_id = await run_to_end(core, fake_target, **github_run())
        assert await core.wait_run(run_id) == "succeeded"
    rows = await db.fetch("SELECT * FROM outbox WHERE kind = 'github.status' ORDER BY id")
    assert [row["state"] for row in rows] == ["dead", "dead"]
    assert [row["attempts"] for row in rows] == [3, 3]
    assert "check the token" in rows[0]["last_error"]
    assert fake_github.statuses == []


async def test_gitlab_transitions_accepted(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with reporting_core(db, settings) as core:
        async with db.acquire() as conn, conn.transaction():
            await gitlab_status(conn, "pending", "waiting for /ok-to-test")
        await run_to_end(core, fake_target, **gitlab_run())
    assert states(gitlab_project.statuses) == [
        ("kubeci/build", "pending"),
        ("kubeci/build", "running"),
        ("kubeci/build", "success"),
    ]
    # Every request was accepted: none was rejected as a forbidden transition.
    assert len(gitlab_project.requests_to("statuses.create")) == 3


async def test_gitlab_running_twice_not_dead(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab
) -> None:
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    for state, description in [
        ("running", "running step 1"),
        ("running", "running step 2"),
        ("success", "succeeded"),
    ]:
        async with db.acquire() as conn, conn.transaction():
            await gitlab_status(conn, state, description)
        # A new process each time: no client remembers what an earlier one sent.
        forges = ForgeClients(settings)
        try:
            await drain_sender(db, settings, forges).drain_once()
        finally:
            await forges.close()
    assert states(gitlab_project.statuses) == [
        ("kubeci/build", "running"),
        ("kubeci/build", "success"),
    ]
    assert len(gitlab_project.requests_to("statuses.create")) == 3
    rows = await db.fetch("SELECT state FROM outbox ORDER BY id")
    assert [row["state"] for row in rows] == ["sent", "sent", "sent"]


async def test_gitlab_cancelled_run_canceled(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab, fake_target: FakeTarget
) -> None:
    fake_target.script("/unit", Reply(delay_s=5))
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with reporting_core(db, settings) as core:
        run_id = await core.start_run(PIPELINE, labels(fake_target), **gitlab_run())
        async with db.acquire() as conn, conn.transaction():
            await core.engine.cancel_run(conn, run_id, reason="merge request closed")
        assert await core.wait_run(run_id) == "cancelled"
        await core.wait_outbox()
    assert states(gitlab_project.statuses) == [
        ("kubeci/build", "running"),
        ("kubeci/build", "canceled"),
    ]
    assert gitlab_project.statuses[-1]["description"] == "cancelled: merge request closed"


async def test_superseded_status_names_newer_sha(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/unit", Reply(delay_s=5))
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        run_id = await core.start_run(PIPELINE, labels(fake_target), **github_run())
        job = await core.state("jobs", run_id, "build")
        async with db.acquire() as conn, conn.transaction():
            await core.engine.cancel_jobs(
                conn,
                [job["id"]],
                reason=f"superseded by {NEWER_SHA[:12]}",
                superseded_by=NEWER_SHA,
            )
        assert await core.wait_run(run_id) == "cancelled"
        await core.wait_outbox()
    assert states(fake_github.statuses) == [
        ("kubeci/build", "pending"),
        ("kubeci/build", "error"),
    ]
    assert fake_github.statuses[-1]["description"] == "cancelled: superseded by bbbbbbb"
    assert states(fake_github.statuses, NEWER_SHA) == []


# Summary comment


async def test_summary_comment_edited_in_place(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run(SHA))
        second_run = await run_to_end(core, fake_target, **github_run(NEWER_SHA))
        run_url = core.engine.run_url(second_run)
    comments = fake_github.comments[(REPO.lower(), PR)]
    assert len(comments) == 1
    assert len(fake_github.requests_to("comments.create")) == 1
    assert fake_github.requests_to("comments.edit")
    body = comments[0]["body"]
    assert body.startswith(SUMMARY_MARKER)
    assert "`bbbbbbb`" in body
    assert "| [build](" + run_url + ") | succeeded |" in body
    # One refresh row per transaction: each run's start, and its job and run completion.
    refreshes = await db.fetchval("SELECT count(*) FROM outbox WHERE kind = 'github.comment'")
    assert refreshes == 4


async def test_summary_comment_shows_failure_excerpt(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/unit", Reply(status=400, body="assert 1 == 2\n```\n<b>no</b>"))
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    body = fake_github.comments[(REPO.lower(), PR)][0]["body"]
    assert "### KubeCI: failed" in body
    assert "| failed |" in body
    assert "`test/unit`:" in body
    assert "````text\n" in body
    assert "assert 1 == 2" in body


async def test_summary_comment_found_by_marker(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_comment(REPO, PR, "Looks good to me")
    bot_login = fake_github.bot_user["login"]
    old = fake_github.add_comment(REPO, PR, SUMMARY_MARKER + "\nold summary", author=bot_login)
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    comments = fake_github.comments[(REPO.lower(), PR)]
    assert len(comments) == 2
    assert fake_github.requests_to("comments.create") == []
    assert "old summary" not in old["body"]


async def test_summary_user_marker_not_adopted(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    quoted = fake_github.add_comment(REPO, PR, SUMMARY_MARKER + " quoted", author="carol")
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    comments = fake_github.comments[(REPO.lower(), PR)]
    assert quoted["body"] == SUMMARY_MARKER + " quoted"
    assert len(comments) == 2
    assert comments[1]["user"]["login"] == fake_github.bot_user["login"]
    assert len(fake_github.requests_to("user.get")) == 1


async def test_summary_configured_bot_login(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    old = fake_github.add_comment(REPO, PR, SUMMARY_MARKER + "\nold", author="CI-Machine")
    settings = forge_settings(database_dsn, fake_github, github_bot_login="ci-machine")
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
    assert "old" not in old["body"]
    assert fake_github.requests_to("comments.create") == []
    assert fake_github.requests_to("user.get") == []


async def test_gitlab_summary_own_note_adopted(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab, fake_target: FakeTarget
) -> None:
    bot_name = gitlab_project.bot_user["username"]
    gitlab_project.add_note(PROJECT_ID, MR, SUMMARY_MARKER + " by a user", author="carol")
    ours = gitlab_project.add_note(PROJECT_ID, MR, SUMMARY_MARKER + "\nold", author=bot_name)
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **gitlab_run(SHA))
    notes = gitlab_project.notes[(PROJECT_ID, MR)]
    assert notes[0]["body"] == SUMMARY_MARKER + " by a user"
    assert "old" not in ours["body"]
    assert gitlab_project.requests_to("notes.create") == []


async def test_gitlab_summary_note_edited_in_place(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab, fake_target: FakeTarget
) -> None:
    gitlab_project.add_note(PROJECT_ID, MR, SUMMARY_MARKER + " pasted by a bot", system=True)
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **gitlab_run(SHA))
        await run_to_end(core, fake_target, **gitlab_run(NEWER_SHA))
    notes = [note for note in gitlab_project.notes[(PROJECT_ID, MR)] if not note["system"]]
    assert len(notes) == 1
    assert len(gitlab_project.requests_to("notes.create")) == 1
    assert "`bbbbbbb`" in notes[0]["body"]


async def test_summary_refresh_without_change_skipped(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    async with reporting_core(db, settings) as core:
        await run_to_end(core, fake_target, **github_run())
        for _ in range(2):
            async with db.acquire() as conn, conn.transaction():
                await enqueue_summary_refresh(
                    conn, forge="github", repository=REPO, pr_number=PR, source={}
                )
            await core.wait_outbox()
        edits = len(fake_github.requests_to("comments.edit"))
        async with db.acquire() as conn, conn.transaction():
            await enqueue_summary_refresh(
                conn, forge="github", repository=REPO, pr_number=PR, source={}
            )
        await core.wait_outbox()
    assert len(fake_github.requests_to("comments.edit")) == edits
    last = await db.fetchrow("SELECT state FROM outbox ORDER BY id DESC LIMIT 1")
    assert last is not None
    assert last["state"] == "skipped"


# GitHub App check runs


@pytest.fixture
def app_settings(
    database_dsn: str, fake_github: FakeGitHub, github_app_key: RsaKeyPair, tmp_path: Path
) -> Settings:
    """Settings of KubeCI as a GitHub App installed on the test repository."""
    fake_github.set_app(APP_ID, github_app_key.public_pem)
    fake_github.add_installation(INSTALLATION, REPO)
    key_file = tmp_path / "app.pem"
    key_file.write_text(github_app_key.private_pem)
    return forge_settings(
        database_dsn,
        fake_github,
        github_token="",
        github_app_id=APP_ID,
        github_private_key_file=str(key_file),
    )


async def test_app_mode_check_run_completed(
    db: asyncpg.Pool, app_settings: Settings, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = app_settings
    fake_target.script("/unit", Reply(status=400, body="boom: disk full"))
    async with reporting_core(db, settings) as core:
        run_id = await run_to_end(
            core, fake_target, **github_run(source={"installation_id": INSTALLATION})
        )
        run_url = core.engine.run_url(run_id)
    assert fake_github.statuses == []
    assert len(fake_github.requests_to("check_runs.create")) == 1
    assert len(fake_github.requests_to("check_runs.update")) == 1
    (check_run,) = fake_github.check_runs.values()
    assert check_run["name"] == "kubeci/build"
    assert check_run["head_sha"] == SHA
    assert check_run["details_url"] == run_url
    assert check_run["status"] == "completed"
    assert check_run["conclusion"] == "failure"
    assert check_run["output"]["title"].startswith("failed in test/unit")
    assert "boom: disk full" in check_run["output"]["text"]
    assert fake_github.requests_to("installation.get") == []
    assert len(fake_github.comments[(REPO.lower(), PR)]) == 1


async def test_app_mode_summary_adopted_by_slug(
    db: asyncpg.Pool, app_settings: Settings, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_comment(REPO, PR, SUMMARY_MARKER + " quoted", author="carol")
    old = fake_github.add_comment(REPO, PR, SUMMARY_MARKER + "\nold", author="kubeci[bot]")
    async with reporting_core(db, app_settings) as core:
        await run_to_end(core, fake_target, **github_run(source={"installation_id": INSTALLATION}))
    assert "old" not in old["body"]
    assert fake_github.requests_to("comments.create") == []
    assert len(fake_github.requests_to("app.get")) == 1


# Configuration errors


async def test_config_error_status_and_comment(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub
) -> None:
    problems = validate_text(BROKEN_PIPELINE)
    assert len(problems) >= 3
    settings = forge_settings(database_dsn, fake_github)
    trigger = FakeTrigger("github", REPO, SHA, PR)
    async with db.acquire() as conn, conn.transaction():
        await enqueue_config_error(
            conn, trigger, problems, "http://ci.test/deliveries/1", settings=settings
        )
    forges = ForgeClients(settings)
    try:
        await drain_sender(db, settings, forges).drain_once()
    finally:
        await forges.close()
    (status,) = fake_github.statuses
    assert status["context"] == "kubeci/config"
    assert status["state"] == "failure"
    assert status["sha"] == SHA
    first = problems[0]
    assert status["description"].startswith(f".kubeci.yml:{first.line}:{first.column}: ")
    assert len(status["description"]) <= 140
    (comment,) = fake_github.comments[(REPO.lower(), PR)]
    for problem in problems:
        assert f".kubeci.yml:{problem.line}:{problem.column}: " in comment["body"]
    assert "### KubeCI: invalid pipeline file" in comment["body"]


async def test_config_error_check_run_in_app_mode(
    db: asyncpg.Pool, app_settings: Settings, fake_github: FakeGitHub
) -> None:
    problems = validate_text(BROKEN_PIPELINE)
    trigger = FakeTrigger("github", REPO, SHA, None, {"installation_id": INSTALLATION})
    async with db.acquire() as conn, conn.transaction():
        await enqueue_config_error(conn, trigger, problems, None, settings=app_settings)
    forges = ForgeClients(app_settings)
    try:
        await drain_sender(db, app_settings, forges).drain_once()
    finally:
        await forges.close()
    assert fake_github.statuses == []
    (check_run,) = fake_github.check_runs.values()
    assert check_run["name"] == "kubeci/config"
    assert check_run["conclusion"] == "failure"
    assert check_run["output"]["title"] == problems[0].format()
    for problem in problems:
        assert problem.format() in check_run["output"]["text"]
    assert fake_github.comments == {}


async def test_config_error_then_run_replaces_comment(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    trigger = FakeTrigger("github", REPO, SHA, PR)
    async with reporting_core(db, settings) as core:
        async with db.acquire() as conn, conn.transaction():
            problems = validate_text(BROKEN_PIPELINE)
            await enqueue_config_error(conn, trigger, problems, None, settings=settings)
        await core.wait_outbox()
        await run_to_end(core, fake_target, **github_run(NEWER_SHA))
    (comment,) = fake_github.comments[(REPO.lower(), PR)]
    assert "invalid pipeline file" not in comment["body"]
    assert "### KubeCI: succeeded" in comment["body"]


# Restart


async def test_restart_neither_loses_nor_repeats(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    # No forge sinks in the core: the report rows wait in the outbox.
    async with running_core(db, settings, hooks=[Reporter(settings).on_event]) as core:
        run_id = await core.start_run(PIPELINE, labels(fake_target), **github_run())
        assert await core.wait_run(run_id) == "succeeded"
    # The first sender sends the pending status; the final one meets a 502 and waits.
    fake_github.script("statuses.create", Scripted(None), Scripted(502))
    forges = ForgeClients(settings)
    try:
        await drain_sender(db, settings, forges, retry_s=600).drain_once()
        assert states(fake_github.statuses) == [("kubeci/build", "pending")]
        # The first sender stops while it holds the final status; its lease runs out.
        await db.execute(
            "UPDATE outbox SET lease_owner = 'stopped', lease_expires_at = now(),"
            " next_attempt_at = now() WHERE state = 'pending'"
        )
        await drain_sender(db, settings, forges).drain_once()
        # A copy of the last status row, as a repeated write would add, is not sent again.
        await db.execute(
            "INSERT INTO outbox (kind, ordering_key, sink_key, payload)"
            " SELECT kind, ordering_key, sink_key, payload FROM outbox"
            " WHERE kind = 'github.status' ORDER BY id DESC LIMIT 1"
        )
        await drain_sender(db, settings, forges).drain_once()
    finally:
        await forges.close()
    assert states(fake_github.statuses) == [
        ("kubeci/build", "pending"),
        ("kubeci/build", "success"),
    ]
    assert len(fake_github.requests_to("statuses.create")) == 3
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'") == 0
    copy = await db.fetchrow("SELECT state FROM outbox ORDER BY id DESC LIMIT 1")
    assert copy is not None
    assert copy["state"] == "skipped"


# Chat-ops replies and reactions


async def test_reply_and_reaction_github(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub
) -> None:
    command = fake_github.add_comment(REPO, PR, "/retest")
    settings = forge_settings(database_dsn, fake_github)
    async with db.acquire() as conn, conn.transaction():
        await enqueue_reaction(
            conn,
            forge="github",
            repository=REPO,
            comment_id=command["id"],
            content="eyes",
            source={},
        )
        await enqueue_reply(
            conn, forge="github", repository=REPO, pr_number=PR, body="Unknown job.", source={}
        )
    forges = ForgeClients(settings)
    try:
        await drain_sender(db, settings, forges).drain_once()
    finally:
        await forges.close()
    assert fake_github.reactions == [{"comment_id": command["id"], "content": "eyes"}]
    reply = fake_github.comments[(REPO.lower(), PR)][-1]
    assert reply["body"].startswith("<!-- kubeci:reply:")
    assert reply["body"].endswith(" -->\nUnknown job.")


async def test_reply_retry_not_posted_twice(
    db: asyncpg.Pool, database_dsn: str, fake_github: FakeGitHub
) -> None:
    settings = forge_settings(database_dsn, fake_github)
    async with db.acquire() as conn, conn.transaction():
        await enqueue_reply(
            conn, forge="github", repository=REPO, pr_number=PR, body="Done.", source={}
        )
    forges = ForgeClients(settings)
    try:
        await drain_sender(db, settings, forges).drain_once()
        # Forget the delivery, as if the sender had stopped before recording it.
        await db.execute("UPDATE outbox SET state = 'pending', sent_at = NULL")
        await db.execute("DELETE FROM sink_state")
        await drain_sender(db, settings, forges).drain_once()
    finally:
        await forges.close()
    assert len(fake_github.comments[(REPO.lower(), PR)]) == 1
    assert len(fake_github.requests_to("comments.create")) == 1


async def test_reaction_gitlab_award_emoji(
    db: asyncpg.Pool, database_dsn: str, gitlab_project: FakeGitLab
) -> None:
    note = gitlab_project.add_note(PROJECT_ID, MR, "/retest")
    settings = forge_settings(database_dsn, gitlab=gitlab_project)
    async with db.acquire() as conn, conn.transaction():
        await enqueue_reaction(
            conn,
            forge="gitlab",
            repository=PROJECT_PATH,
            comment_id=note["id"],
            content="thumbsup",
            source={"project_id": PROJECT_ID},
            pr_number=MR,
        )
    forges = ForgeClients(settings)
    try:
        await drain_sender(db, settings, forges).drain_once()
    finally:
        await forges.close()
    assert [award["name"] for award in gitlab_project.award_emoji] == ["thumbsup"]


async def test_enqueue_rejects_unknown_forge(db: asyncpg.Pool) -> None:
    async with db.acquire() as conn, conn.transaction():
        with pytest.raises(ValueError, match="bitbucket"):
            await enqueue_summary_refresh(
                conn, forge="bitbucket", repository=REPO, pr_number=PR, source={}
            )


# Text helpers


def test_code_block_outlasts_backticks() -> None:
    block = code_block("a ``` b ````` c")
    assert block.startswith("``````text\n")
    assert block.endswith("\n``````")


def test_tail_keeps_last_lines() -> None:
    text = "\n".join(f"line {number}" for number in range(100))
    assert tail(text, 3, 1000) == "[earlier lines cut]\nline 97\nline 98\nline 99"


def test_tail_cuts_by_chars() -> None:
    assert tail("x" * 50 + "\nshort", 10, 10) == "[earlier lines cut]\nshort"
