"""Chat-ops and untrusted pull requests end to end: signed webhooks over HTTP to the served
application, real Postgres, the fake GitHub and GitLab, and a fake webhook target that
the pipelines' tasks call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests import payloads as p
from tests.fakes import Scripted
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.target import FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core

GITHUB_SECRET = "gh-webhook-secret"
GITLAB_SECRET = "gl-webhook-secret"
REPO = "octo-org/widgets"
FORK = "mallory/widgets"
PROJECT_ID = 42
FORK_PROJECT_ID = 77
PROJECT = "acme/widgets"
BOT_LOGIN = "kubeci-bot"
SECRET_VALUE = "s3cr3t-deploy-token"
SHA_1 = "1" * 40
SHA_2 = "2" * 40
SHA_3 = "3" * 40

# GitHub users: a writer, a user with triage (not write) and an outsider.
WRITER = "maria"
TRIAGER = "tom"
OUTSIDER = "olaf"
# GitLab user ids and their access levels.
GL_WRITER_ID = 7
GL_REPORTER_ID = 8


def webhook_task(name: str, url: str, extra: str = "") -> str:
    return (
        f"          - name: {name}\n"
        "            action: webhook\n"
        "            timeout_s: 30\n"
        f"{extra}"
        "            arguments:\n"
        f'              url: "{url}"\n'
        '              body: {sha: "${sha}", trigger: "${trigger}"}\n'
    )


def pipeline(target: FakeTarget) -> str:
    """Two one-task jobs: build calls /build, lint calls /lint."""
    return (
        "jobs:\n"
        "  - name: build\n"
        "    steps:\n"
        "      - name: compile\n"
        "        tasks:\n"
        f"{webhook_task('compile', target.url('/build'))}"
        "  - name: lint\n"
        "    steps:\n"
        "      - name: check\n"
        "        tasks:\n"
        f"{webhook_task('check', target.url('/lint'))}"
    )


def build_pipeline(target: FakeTarget) -> str:
    """One one-task job, build, which calls /build."""
    return (
        "jobs:\n"
        "  - name: build\n"
        "    steps:\n"
        "      - name: compile\n"
        "        tasks:\n"
        f"{webhook_task('compile', target.url('/build'))}"
    )


def secret_pipeline(target: FakeTarget) -> str:
    """One job whose task sends a server secret in a header."""
    return (
        "jobs:\n"
        "  - name: deploy\n"
        "    steps:\n"
        "      - name: push\n"
        "        tasks:\n"
        "          - name: push\n"
        "            action: webhook\n"
        "            arguments:\n"
        f'              url: "{target.url("/deploy")}"\n'
        '              headers: {Authorization: "Bearer ${secrets.DEPLOY_TOKEN}"}\n'
    )


NON_INTERRUPTIBLE = "            interruptible: false\n"


def slow_pipeline(target: FakeTarget) -> str:
    """One job with a slow interruptible task and a slow non-interruptible one."""
    return (
        "jobs:\n"
        "  - name: deploy\n"
        "    steps:\n"
        "      - name: roll\n"
        "        tasks:\n"
        f"{webhook_task('wait', target.url('/wait'))}"
        f"{webhook_task('migrate', target.url('/migrate'), NON_INTERRUPTIBLE)}"
    )


@pytest.fixture
async def core(
    db: asyncpg.Pool,
    database_dsn: str,
    fake_github: FakeGitHub,
    fake_gitlab: FakeGitLab,
) -> AsyncIterator[Harness]:
    fake_gitlab.add_project(PROJECT_ID, PROJECT)
    fake_gitlab.add_project(FORK_PROJECT_ID, "mallory/widgets")
    fake_github.set_permission(REPO, "alice", "write")
    fake_github.set_permission(REPO, WRITER, "maintain")
    fake_github.set_permission(REPO, TRIAGER, "triage")
    fake_gitlab.set_member(PROJECT_ID, GL_WRITER_ID, 30)
    fake_gitlab.set_member(PROJECT_ID, GL_REPORTER_ID, 20)
    settings = fast_settings(
        database_dsn,
        github_api_url=fake_github.url,
        github_token="ghp-test-token",
        github_webhook_secret=GITHUB_SECRET,
        github_bot_login=BOT_LOGIN,
        gitlab_url=fake_gitlab.url,
        gitlab_token="glpat-test-token",
        gitlab_webhook_secret=GITLAB_SECRET,
        gitlab_timeout_s=2.0,
        secrets={"DEPLOY_TOKEN": SECRET_VALUE},
    )
    async with running_core(db, settings, reporting=True, chatops=True) as harness:
        yield harness


# ---- helpers ---------------------------------------------------------------------------


async def post(core: Harness, forge: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    url = f"{core.base_url}/webhooks/{forge}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def github_event(core: Harness, payload: dict[str, Any], event: str) -> dict[str, Any]:
    body, headers = p.github_request(
        payload, event, secret=GITHUB_SECRET, delivery=str(uuid.uuid4())
    )
    return await post(core, "github", body, headers)


async def gitlab_event(core: Harness, payload: dict[str, Any]) -> dict[str, Any]:
    extra = {"X-Gitlab-Event-UUID": str(uuid.uuid4())}
    body, headers = p.gitlab_request(payload, token=GITLAB_SECRET, extra_headers=extra)
    return await post(core, "gitlab", body, headers)


def serve_pr(
    fake_github: FakeGitHub,
    text: str,
    *,
    sha: str = p.SHA_C,
    number: int = 7,
    author: str = "alice",
    fork: bool = False,
    labels: tuple[str, ...] = (),
) -> None:
    """Let the fake GitHub serve pull request `number` and its pipeline file at `sha`."""
    fake_github.add_file(REPO, sha, ".kubeci.yml", text)
    fake_github.add_pull_request(
        REPO,
        number,
        head_sha=sha,
        author=author,
        labels=labels,
        head_repo=FORK if fork else None,
    )


async def open_pr(
    core: Harness,
    fake_github: FakeGitHub,
    text: str,
    *,
    action: str = "opened",
    sha: str = p.SHA_C,
    number: int = 7,
    author: str = "alice",
    fork: bool = False,
    labels: tuple[str, ...] = (),
) -> dict[str, Any]:
    serve_pr(fake_github, text, sha=sha, number=number, author=author, fork=fork, labels=labels)
    fields: dict[str, Any] = {"number": number, "head_sha": sha, "author": author}
    if fork:
        fields["head_repo"] = p.github_repo(FORK, 2002)
    payload = p.github_pull_request(action, labels=labels, **fields)
    return await github_event(core, payload, "pull_request")


async def comment(
    core: Harness,
    body: str,
    *,
    author: str = WRITER,
    number: int = 7,
    user_type: str = "User",
    comment_id: int = 5001,
    action: str = "created",
    on_pull_request: bool = True,
) -> dict[str, Any]:
    payload = p.github_issue_comment(
        action,
        number=number,
        body=body,
        author=author,
        user_type=user_type,
        comment_id=comment_id,
        on_pull_request=on_pull_request,
    )
    return await github_event(core, payload, "issue_comment")


def run_ids(response: dict[str, Any]) -> list[int]:
    return [int(run["id"]) for run in response.get("runs", [])]


async def job_names(core: Harness, run_id: int) -> list[str]:
    rows = await core.pool.fetch(
        "SELECT name FROM jobs WHERE run_id = $1 ORDER BY position", run_id
    )
    return [row["name"] for row in rows]


async def run_row(core: Harness, run_id: int) -> asyncpg.Record:
    row = await core.pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    assert row is not None
    return row


async def run_count(core: Harness) -> int:
    return int(await core.pool.fetchval("SELECT count(*) FROM runs"))


def replies_on(fake_github: FakeGitHub, number: int = 7) -> list[str]:
    return [c["body"] for c in fake_github.comments.get((REPO, number), [])]


def chatops_replies(fake_github: FakeGitHub, number: int = 7) -> list[str]:
    """KubeCI's comments on the PR other than the run summary."""
    return [body for body in replies_on(fake_github, number) if "kubeci:summary" not in body]


def statuses(fake_github: FakeGitHub, context: str) -> list[dict[str, Any]]:
    return [s for s in fake_github.statuses if s["context"] == context]


async def settle(core: Harness, *run_ids_: int) -> None:
    for run_id in run_ids_:
        await core.wait_run(run_id)
    await core.wait_outbox()


# ---- the parser's rules through the service --------------------------------------------


async def test_bot_comment_with_retest_does_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/retest", author="ci-helper[bot]", user_type="Bot")
    await core.wait_outbox()
    assert response["chatops"]["outcome"] == "ignored"
    assert await run_count(core) == 0
    assert fake_github.requests_to("permission.get") == []
    assert replies_on(fake_github) == []


async def test_own_account_comment_does_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    fake_github.set_permission(REPO, BOT_LOGIN, "write")
    response = await comment(core, "/retest", author=BOT_LOGIN)
    assert response["chatops"]["outcome"] == "ignored"
    assert await run_count(core) == 0


async def test_comment_with_kubeci_marker_does_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    body = "@maria\n\n/retest\n\n<!-- kubeci:reply:0123abcd -->"
    response = await comment(core, body, author="kubeci-helper")
    assert response["chatops"]["outcome"] == "ignored"
    assert fake_github.requests_to("permission.get") == []


async def test_comment_on_plain_issue_does_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    response = await comment(core, "/retest", on_pull_request=False)
    await core.wait_outbox()
    assert response["outcome"] == "ignored"
    assert await run_count(core) == 0
    assert fake_github.requests == []


async def test_edited_comment_does_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/test all", action="edited")
    await core.wait_outbox()
    assert response["outcome"] == "ignored"
    assert await run_count(core) == 0
    assert fake_github.requests == []


async def test_comment_without_commands_reads_nothing(
    core: Harness, fake_github: FakeGitHub
) -> None:
    response = await comment(core, "LGTM, but see `/retest` docs\n> /cancel")
    assert response["chatops"]["outcome"] == "no_commands"
    assert fake_github.requests == []


# ---- commands by a writer --------------------------------------------------------------


async def test_retest_reruns_failed_jobs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(status=500), Reply(status=200))
    first = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    assert await core.wait_run(first[0]) == "failed"
    response = await comment(core, "/retest", comment_id=6001)
    (rerun,) = run_ids(response)
    assert await core.wait_run(rerun) == "succeeded"
    await core.wait_outbox()
    assert await job_names(core, rerun) == ["build"]
    assert {"comment_id": 6001, "content": "+1"} in fake_github.reactions
    assert chatops_replies(fake_github) == []
    labels = (await run_row(core, rerun))["labels"]
    assert labels["trigger"] == "comment"
    assert labels["comment.author"] == WRITER
    assert labels["event"] == "pull_request"
    assert labels["pr.number"] == "7"


async def test_retest_runs_with_pr_labels_and_trust(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target), labels=("needs-review",))
    (run_id,) = run_ids(await comment(core, "/retest"))
    row = await run_row(core, run_id)
    assert row["sha"] == p.SHA_C
    assert row["trusted"] is True
    assert row["labels"]["pr.labels"] == ["needs-review"]
    assert await job_names(core, run_id) == ["build", "lint"]


async def test_retest_when_nothing_failed_replies(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    (first,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    assert await core.wait_run(first) == "succeeded"
    response = await comment(core, "/retest")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    assert "Nothing to retest" in reply


async def test_retest_counts_one_permission_lookup(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target), author=WRITER)
    await comment(core, "/retest\n/test lint\n/retest", author=WRITER)
    assert len(fake_github.requests_to("permission.get")) == 1


async def test_test_one_job(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    (run_id,) = run_ids(await comment(core, "/test lint"))
    assert await core.wait_run(run_id) == "succeeded"
    assert await job_names(core, run_id) == ["lint"]
    assert [r.path for r in fake_target.received()] == ["/lint"]


async def test_test_all_runs_every_job(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    (run_id,) = run_ids(await comment(core, "/TEST ALL"))
    assert await job_names(core, run_id) == ["build", "lint"]


async def test_test_unknown_job_lists_jobs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/test deploy")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    assert "`deploy`" in reply
    assert "`build`, `lint`" in reply
    assert fake_github.reactions == []


async def test_test_without_job_replies(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/test")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    assert "needs a job name" in reply


async def test_cancel_stops_active_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=5.0))
    (run_id,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    response = await comment(core, "/cancel", comment_id=6002)
    assert response["chatops"]["cancelled_runs"] == [run_id]
    assert await core.wait_run(run_id) == "cancelled"
    await core.wait_outbox()
    assert {"comment_id": 6002, "content": "+1"} in fake_github.reactions
    build = await core.state("jobs", run_id, "build")
    assert "cancelled by maria" in build["message"]


async def test_cancel_with_nothing_running_replies(core: Harness, fake_github: FakeGitHub) -> None:
    response = await comment(core, "/cancel")
    await core.wait_outbox()
    assert response["chatops"]["cancelled_runs"] == []
    (reply,) = chatops_replies(fake_github)
    assert "Nothing to cancel" in reply


async def test_help_lists_commands_and_jobs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/help")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    for command in ("/retest", "/test <job>", "/test all", "/cancel", "/ok-to-test", "/help"):
        assert f"`{command}`" in reply
    assert "`build`, `lint`" in reply


async def test_unknown_command_gets_one_reply(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/deploy prod\n/lgtm")
    await core.wait_outbox()
    assert response["chatops"]["unknown"] == ["/deploy prod", "/lgtm"]
    (reply,) = chatops_replies(fake_github)
    assert "`/deploy`, `/lgtm` are not KubeCI commands" in reply
    assert "`/help`" in reply
    assert fake_github.requests_to("permission.get") == []


async def test_several_commands_share_one_reply(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/test lint\n/frobnicate\n/help")
    await core.wait_outbox()
    (run_id,) = run_ids(response)
    assert await job_names(core, run_id) == ["lint"]
    (reply,) = chatops_replies(fake_github)
    assert "`/frobnicate` is not a KubeCI command" in reply
    assert "`/help`" in reply
    assert {"comment_id": 5001, "content": "+1"} in fake_github.reactions


async def test_retest_on_closed_pr_starts_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    fake_github.pulls[(REPO, 7)]["state"] = "closed"
    response = await comment(core, "/retest")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    assert "closed" in reply


async def test_missing_pipeline_file_replies(core: Harness, fake_github: FakeGitHub) -> None:
    fake_github.add_pull_request(REPO, 7, head_sha=p.SHA_C)
    response = await comment(core, "/test all")
    await core.wait_outbox()
    assert run_ids(response) == []
    (reply,) = chatops_replies(fake_github)
    assert "no `.kubeci.yml`" in reply


async def test_ok_to_test_after_run_only_labels(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    (first,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    await core.wait_run(first)
    response = await comment(core, "/ok-to-test")
    await core.wait_outbox()
    assert run_ids(response) == []
    assert fake_github.labels[(REPO, 7)] == ["ok-to-test"]
    (reply,) = chatops_replies(fake_github)
    assert "has run already" in reply
    assert statuses(fake_github, "kubeci/ok-to-test") == []


async def test_forge_failure_gets_one_reply(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    fake_github.script("pulls.get", Scripted(502))
    response = await comment(core, "/retest")
    await core.wait_outbox()
    assert response["chatops"]["outcome"] == "forge_unavailable"
    assert await run_count(core) == 0
    (reply,) = chatops_replies(fake_github)
    assert "could not act on this comment" in reply
    assert "Comment again" in reply


async def send_twice(core: Harness, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one comment as a repository hook and an organisation hook would: at once,
    each delivery with its own id."""
    requests = [
        p.github_request(payload, "issue_comment", secret=GITHUB_SECRET, delivery=str(uuid.uuid4()))
        for _ in range(2)
    ]
    return list(await asyncio.gather(*(post(core, "github", *request) for request in requests)))


async def test_comment_twice_at_once_acts_once(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    payload = p.github_issue_comment(body="/test all\n/nope", author=WRITER, comment_id=8802)
    responses = await send_twice(core, payload)
    await core.wait_outbox()
    outcomes = sorted(response["chatops"]["outcome"] for response in responses)
    assert outcomes == ["acted", "duplicate"]
    assert await run_count(core) == 1
    assert len(chatops_replies(fake_github)) == 1
    assert len(fake_github.reactions) == 1


async def test_forge_failure_claims_comment(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    # The failure reply asks for a new comment, so a second webhook of this one is silent.
    serve_pr(fake_github, pipeline(fake_target))
    fake_github.script("pulls.get", Scripted(502))
    first = await comment(core, "/retest", comment_id=8803)
    second = await comment(core, "/retest", comment_id=8803)
    await core.wait_outbox()
    assert first["chatops"]["outcome"] == "forge_unavailable"
    assert second["chatops"]["outcome"] == "duplicate"
    assert await run_count(core) == 0
    assert len(chatops_replies(fake_github)) == 1


async def test_comment_run_superseded_by_push(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/wait", Reply(delay_s=5.0), Reply(delay_s=0.0))
    text = slow_pipeline(fake_target)
    serve_pr(fake_github, text, sha=SHA_1)
    (by_comment,) = run_ids(await comment(core, "/test deploy"))
    (pushed,) = run_ids(await open_pr(core, fake_github, text, action="synchronize", sha=SHA_2))
    assert await core.wait_run(by_comment) == "cancelled"
    job = await core.state("jobs", by_comment, "deploy")
    assert job["superseded_by"] == SHA_2
    assert await core.wait_run(pushed) == "succeeded"


async def test_comment_run_on_stale_head_supersedes_nothing(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = build_pipeline(fake_target)
    (pushed,) = run_ids(await open_pr(core, fake_github, text, action="synchronize", sha=SHA_2))
    # The forge's API still returns the previous head for a moment.
    serve_pr(fake_github, text, sha=SHA_1)
    (by_comment,) = run_ids(await comment(core, "/test build"))
    await settle(core, pushed, by_comment)
    assert (await run_row(core, by_comment))["sha"] == SHA_1
    build = await core.state("jobs", by_comment, "build")
    assert build["group_key"] == ""
    (reply,) = chatops_replies(fake_github)
    assert "cancels no other run" in reply
    assert SHA_2[:7] in reply


# ---- commands by users without write access --------------------------------------------


@pytest.mark.parametrize("body", ["/retest", "/test all", "/test lint", "/cancel", "/ok-to-test"])
async def test_non_writer_command_refused_once(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget, body: str
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, f"{body}\n{body}", author=TRIAGER)
    await core.wait_outbox()
    assert response["chatops"]["refused"] == [body]
    assert run_ids(response) == []
    assert await run_count(core) == 0
    (reply,) = chatops_replies(fake_github)
    assert "Only users with write access" in reply
    assert "`/ok-to-test`" in reply
    assert reply.startswith("<!-- kubeci:reply:")
    assert f"-->\n@{TRIAGER}\n" in reply
    assert fake_github.reactions == []
    assert fake_github.labels == {}


async def test_non_writer_cancel_leaves_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=1.0))
    (run_id,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    await comment(core, "/cancel", author=OUTSIDER)
    assert await core.wait_run(run_id) == "succeeded"


async def test_non_writer_help_is_answered(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    response = await comment(core, "/help", author=OUTSIDER)
    await core.wait_outbox()
    assert response["chatops"]["accepted"] == ["/help"]
    (reply,) = chatops_replies(fake_github)
    assert "`build`, `lint`" in reply
    assert fake_github.requests_to("permission.get") == []


async def test_non_writer_mixed_commands_one_reply(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target))
    await comment(core, "/retest\n/nope\n/help", author=OUTSIDER)
    await core.wait_outbox()
    (reply,) = chatops_replies(fake_github)
    assert "Only users with write access" in reply
    assert "`/nope` is not a KubeCI command" in reply
    assert "`build`, `lint`" in reply


# ---- untrusted pull requests -----------------------------------------------------------


async def test_fork_pr_waits_for_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    response = await open_pr(core, fake_github, pipeline(fake_target), author="mallory", fork=True)
    await core.wait_outbox()
    assert response["outcome"] == "awaiting_approval"
    assert "fork" in response["reason"]
    assert await run_count(core) == 0
    (status,) = statuses(fake_github, "kubeci/ok-to-test")
    assert status["state"] == "pending"
    assert status["sha"] == p.SHA_C
    assert "/ok-to-test" in status["description"]
    (notice,) = chatops_replies(fake_github)
    assert "`/ok-to-test`" in notice
    assert "fork" in notice


async def test_fork_pr_notice_once_per_pr(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = pipeline(fake_target)
    await open_pr(core, fake_github, text, author="mallory", fork=True, sha=SHA_1)
    await open_pr(core, fake_github, text, action="synchronize", fork=True, sha=SHA_2)
    await core.wait_outbox()
    assert len(chatops_replies(fake_github)) == 1
    pending = statuses(fake_github, "kubeci/ok-to-test")
    assert [s["sha"] for s in pending] == [SHA_1, SHA_2]


async def test_non_writer_same_repo_pr_waits(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    response = await open_pr(core, fake_github, pipeline(fake_target), author=TRIAGER)
    await core.wait_outbox()
    assert response["outcome"] == "awaiting_approval"
    assert "write access" in response["reason"]
    (notice,) = chatops_replies(fake_github)
    assert TRIAGER in notice


async def test_writer_same_repo_pr_runs_trusted(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    (run_id,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    assert (await run_row(core, run_id))["trusted"] is True
    await settle(core, run_id)
    assert statuses(fake_github, "kubeci/ok-to-test") == []


async def test_deleted_fork_waits(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, pipeline(fake_target), author="alice")
    payload = p.github_pull_request("opened", number=7, head_sha=p.SHA_C, fork_deleted=True)
    response = await github_event(core, payload, "pull_request")
    assert response["outcome"] == "awaiting_approval"


async def test_ok_to_test_by_non_writer_refused(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    await open_pr(core, fake_github, pipeline(fake_target), author="mallory", fork=True)
    await core.wait_outbox()
    response = await comment(core, "/ok-to-test", author="mallory")
    await core.wait_outbox()
    assert response["chatops"]["refused"] == ["/ok-to-test"]
    assert await run_count(core) == 0
    assert fake_github.labels == {}
    notice, refusal = chatops_replies(fake_github)
    assert "`/ok-to-test`" in notice
    assert "Only users with write access" in refusal


async def test_ok_to_test_by_writer_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    await open_pr(core, fake_github, pipeline(fake_target), author="mallory", fork=True)
    response = await comment(core, "/ok-to-test", comment_id=6003)
    (run_id,) = run_ids(response)
    assert await core.wait_run(run_id) == "succeeded"
    await core.wait_outbox()
    assert fake_github.labels[(REPO, 7)] == ["ok-to-test"]
    row = await run_row(core, run_id)
    assert row["trusted"] is False
    assert row["labels"]["trigger"] == "comment"
    assert row["labels"]["fork"] == "true"
    assert await job_names(core, run_id) == ["build", "lint"]
    states = [s["state"] for s in statuses(fake_github, "kubeci/ok-to-test")]
    assert states == ["pending", "success"]
    assert {"comment_id": 6003, "content": "+1"} in fake_github.reactions


async def test_labelled_fork_pr_push_runs_untrusted(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = pipeline(fake_target)
    await open_pr(core, fake_github, text, author="mallory", fork=True, sha=SHA_1)
    (approved,) = run_ids(await comment(core, "/ok-to-test"))
    await core.wait_run(approved)
    response = await open_pr(
        core,
        fake_github,
        text,
        action="synchronize",
        author="mallory",
        fork=True,
        sha=SHA_2,
        labels=("ok-to-test",),
    )
    (pushed,) = run_ids(response)
    assert await core.wait_run(pushed) == "succeeded"
    row = await run_row(core, pushed)
    assert row["sha"] == SHA_2
    assert row["trusted"] is False


async def test_removed_label_revokes_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = pipeline(fake_target)
    await open_pr(core, fake_github, text, author="mallory", fork=True, sha=SHA_1)
    await comment(core, "/ok-to-test")
    response = await open_pr(
        core, fake_github, text, action="synchronize", author="mallory", fork=True, sha=SHA_2
    )
    assert response["outcome"] == "awaiting_approval"


async def test_ok_to_test_stores_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    await open_pr(core, fake_github, pipeline(fake_target), author="mallory", fork=True)
    await comment(core, "/ok-to-test", comment_id=6004)
    row = await core.pool.fetchrow("SELECT * FROM approvals")
    assert row is not None
    assert (row["forge"], row["repository"], row["pr_number"]) == ("github", REPO, 7)
    assert row["approved_by"] == WRITER
    assert row["comment_id"] == 6004


async def test_triager_labelled_fork_pr_waits(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    # GitHub's triage role may add labels but has no write access.
    response = await open_pr(
        core, fake_github, pipeline(fake_target), author=TRIAGER, fork=True, labels=("ok-to-test",)
    )
    assert response["outcome"] == "awaiting_approval"
    assert "label alone approves nothing" in response["reason"]
    assert await run_count(core) == 0


async def test_unlabel_deletes_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = pipeline(fake_target)
    await open_pr(core, fake_github, text, author="mallory", fork=True, sha=SHA_1)
    await comment(core, "/ok-to-test")
    unlabeled = p.github_pull_request(
        "unlabeled", label="ok-to-test", number=7, head_sha=SHA_1, author="mallory"
    )
    response = await github_event(core, unlabeled, "pull_request")
    assert "approval is revoked" in response["reason"]
    assert await core.pool.fetchval("SELECT count(*) FROM approvals") == 0
    # Someone without write access adds the label again: the next push still waits.
    relabelled = await open_pr(
        core,
        fake_github,
        text,
        action="synchronize",
        author="mallory",
        fork=True,
        sha=SHA_2,
        labels=("ok-to-test",),
    )
    assert relabelled["outcome"] == "awaiting_approval"


async def test_unlabel_of_other_label_keeps_approval(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    await open_pr(core, fake_github, pipeline(fake_target), author="mallory", fork=True)
    await comment(core, "/ok-to-test")
    unlabeled = p.github_pull_request("unlabeled", label="needs-review", number=7)
    response = await github_event(core, unlabeled, "pull_request")
    assert response["outcome"] == "ignored"
    assert await core.pool.fetchval("SELECT count(*) FROM approvals") == 1


async def test_untrusted_run_gets_no_secrets(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    text = secret_pipeline(fake_target)
    await open_pr(core, fake_github, text, author="mallory", fork=True)
    (run_id,) = run_ids(await comment(core, "/ok-to-test"))
    assert await core.wait_run(run_id) == "failed"
    task = await core.state("tasks", run_id, "push")
    assert "secrets.DEPLOY_TOKEN" in task["message"]
    assert "untrusted" in task["message"]
    assert fake_target.received("/deploy") == []
    assert SECRET_VALUE not in str(fake_github.statuses)


async def test_trusted_run_gets_secrets(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    (run_id,) = run_ids(await open_pr(core, fake_github, secret_pipeline(fake_target)))
    assert await core.wait_run(run_id) == "succeeded"
    (request,) = fake_target.received("/deploy")
    assert request.headers["Authorization"] == f"Bearer {SECRET_VALUE}"


async def test_writer_retest_on_fork_runs_untrusted(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    serve_pr(fake_github, secret_pipeline(fake_target), author="mallory", fork=True)
    (run_id,) = run_ids(await comment(core, "/retest"))
    assert await core.wait_run(run_id) == "failed"
    assert (await run_row(core, run_id))["trusted"] is False
    assert fake_target.received("/deploy") == []


async def test_push_is_trusted(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_github.add_file(REPO, SHA_1, ".kubeci.yml", pipeline(fake_target))
    payload = p.github_push("refs/heads/main", after=SHA_1, sender=OUTSIDER)
    (run_id,) = run_ids(await github_event(core, payload, "push"))
    assert (await run_row(core, run_id))["trusted"] is True
    assert fake_github.requests_to("permission.get") == []


# ---- superseded and abandoned runs -----------------------------------------------------


async def test_three_quick_pushes_supersede(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/wait", Reply(delay_s=0.8), Reply(delay_s=0.8), Reply(delay_s=0.1))
    fake_target.script("/migrate", Reply(delay_s=0.5))
    text = slow_pipeline(fake_target)
    ids = []
    for action, sha in (("opened", SHA_1), ("synchronize", SHA_2), ("synchronize", SHA_3)):
        ids.extend(run_ids(await open_pr(core, fake_github, text, action=action, sha=sha)))
    first, second, third = ids
    assert await core.wait_run(third) == "succeeded"
    assert await core.wait_run(first) == "cancelled"
    assert await core.wait_run(second) == "cancelled"
    await core.wait_outbox()

    for run_id, newer in ((first, SHA_2), (second, SHA_3)):
        job = await core.state("jobs", run_id, "deploy")
        assert job["superseded_by"] == newer
        migrate = await core.state("tasks", run_id, "migrate")
        assert migrate["state"] == "succeeded"
        wait = await core.state("tasks", run_id, "wait")
        assert wait["state"] == "cancelled"
    assert len(fake_target.received("/migrate")) == 3

    by_sha = {
        sha: [s for s in statuses(fake_github, "kubeci/deploy") if s["sha"] == sha]
        for sha in (SHA_1, SHA_2, SHA_3)
    }
    assert newer_named(by_sha[SHA_1][-1], SHA_2)
    assert newer_named(by_sha[SHA_2][-1], SHA_3)
    assert by_sha[SHA_3][-1]["state"] == "success"
    assert sum(len(found) for found in by_sha.values()) == len(
        statuses(fake_github, "kubeci/deploy")
    )


def newer_named(status: dict[str, Any], sha: str) -> bool:
    return status["state"] in ("error", "failure") and sha[:7] in status["description"]


async def test_statuses_stay_on_their_sha(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/wait", Reply(delay_s=0.5), Reply(delay_s=0.0))
    fake_target.script("/migrate", Reply(delay_s=0.0))
    text = slow_pipeline(fake_target)
    (first,) = run_ids(await open_pr(core, fake_github, text, sha=SHA_1))
    (second,) = run_ids(await open_pr(core, fake_github, text, action="synchronize", sha=SHA_2))
    await settle(core, first, second)
    run_shas = {first: SHA_1, second: SHA_2}
    rows = await core.pool.fetch(
        "SELECT run_id, payload->>'sha' AS sha FROM outbox WHERE kind = 'github.status'"
        " AND run_id IS NOT NULL"
    )
    assert rows
    for row in rows:
        assert row["sha"] == run_shas[row["run_id"]]


async def test_closed_pr_cancels_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=5.0))
    (run_id,) = run_ids(await open_pr(core, fake_github, build_pipeline(fake_target)))
    payload = p.github_pull_request("closed", number=7, head_sha=p.SHA_C, merged=True)
    response = await github_event(core, payload, "pull_request")
    assert response["cancelled_runs"] == [run_id]
    assert await core.wait_run(run_id) == "cancelled"
    await core.wait_outbox()
    (final,) = [s for s in statuses(fake_github, "kubeci/build") if s["state"] != "pending"]
    assert "merged" in final["description"]


# Cancelling a run's jobs while a worker ends one of them once deadlocked: the cancel
# locked the run after ending its first job and then waited for the worker's job.
async def test_closed_pr_cancels_while_job_finishes(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=5.0))
    (run_id,) = run_ids(await open_pr(core, fake_github, pipeline(fake_target)))
    payload = p.github_pull_request("closed", number=7, head_sha=p.SHA_C)
    response = await github_event(core, payload, "pull_request")
    assert response["cancelled_runs"] == [run_id]


async def test_deleted_branch_cancels_runs(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=5.0))
    fake_github.add_file(REPO, SHA_1, ".kubeci.yml", build_pipeline(fake_target))
    push = p.github_push("refs/heads/topic", after=SHA_1)
    (run_id,) = run_ids(await github_event(core, push, "push"))
    deletion = p.github_push("refs/heads/topic", before=SHA_1, after=p.ZERO)
    response = await github_event(core, deletion, "push")
    assert response["cancelled_runs"] == [run_id]
    assert await core.wait_run(run_id) == "cancelled"


# ---- GitLab ----------------------------------------------------------------------------


def serve_mr(
    fake_gitlab: FakeGitLab,
    text: str,
    *,
    sha: str = p.SHA_C,
    author_id: int = GL_WRITER_ID,
    fork: bool = False,
    labels: tuple[str, ...] = (),
) -> None:
    fake_gitlab.add_file(PROJECT_ID, sha, ".kubeci.yml", text)
    fake_gitlab.add_merge_request(
        PROJECT_ID,
        3,
        sha=sha,
        author="mallory" if fork else "alice",
        author_id=author_id,
        labels=labels,
        source_project_id=FORK_PROJECT_ID if fork else None,
    )


async def note(
    core: Harness, fake_gitlab: FakeGitLab, body: str, *, user_id: int, username: str
) -> tuple[int, dict[str, Any]]:
    """Post a note on MR !3 to the fake GitLab and send its webhook; return its id."""
    stored = fake_gitlab.add_note(PROJECT_ID, 3, body, author=username)
    payload = p.gitlab_note(body=body, username=username, user_id=user_id, note_id=stored["id"])
    return stored["id"], await gitlab_event(core, payload)


def gitlab_notes(fake_gitlab: FakeGitLab) -> list[str]:
    """KubeCI's notes on MR !3 other than the run summary."""
    notes = fake_gitlab.notes.get((PROJECT_ID, 3), [])
    mine = [n["body"] for n in notes if n["author"] == fake_gitlab.bot_user]
    return [body for body in mine if "kubeci:summary" not in body]


async def test_gitlab_writer_retest_awards_thumbsup(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    note_id, response = await note(
        core, fake_gitlab, "/retest", user_id=GL_WRITER_ID, username="alice"
    )
    (run_id,) = run_ids(response)
    assert await core.wait_run(run_id) == "succeeded"
    await core.wait_outbox()
    assert {"note_id": note_id, "name": "thumbsup", "user": 99} in fake_gitlab.award_emoji
    row = await run_row(core, run_id)
    assert row["labels"]["trigger"] == "comment"
    assert row["ref"] == "refs/merge-requests/3/head"
    assert row["trusted"] is True


async def test_gitlab_reporter_refused_once(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    _, response = await note(
        core, fake_gitlab, "/retest\n/cancel", user_id=GL_REPORTER_ID, username="rita"
    )
    await core.wait_outbox()
    assert response["chatops"]["refused"] == ["/retest", "/cancel"]
    assert await run_count(core) == 0
    (reply,) = gitlab_notes(fake_gitlab)
    assert "Only users with write access" in reply
    assert fake_gitlab.award_emoji == []


async def test_gitlab_fork_mr_waits_then_ok_to_test(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target), author_id=55, fork=True)
    opened = p.gitlab_merge_request(
        "open", iid=3, source_project_id=FORK_PROJECT_ID, source_path="mallory/widgets"
    )
    response = await gitlab_event(core, opened)
    await core.wait_outbox()
    assert response["outcome"] == "awaiting_approval"
    pending = [s for s in fake_gitlab.statuses if s["name"] == "kubeci/ok-to-test"]
    assert [s["state"] for s in pending] == ["pending"]
    assert len(gitlab_notes(fake_gitlab)) == 1

    _, approved = await note(
        core, fake_gitlab, "/ok-to-test", user_id=GL_WRITER_ID, username="alice"
    )
    (run_id,) = run_ids(approved)
    assert await core.wait_run(run_id) == "succeeded"
    await core.wait_outbox()
    assert fake_gitlab.merge_requests[(PROJECT_ID, 3)]["labels"] == ["ok-to-test"]
    assert (await run_row(core, run_id))["trusted"] is False


async def test_gitlab_unlabel_deletes_approval(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target), author_id=55, fork=True)
    await note(core, fake_gitlab, "/ok-to-test", user_id=GL_WRITER_ID, username="alice")
    assert await core.pool.fetchval("SELECT count(*) FROM approvals") == 1
    updated = p.gitlab_merge_request(
        "update",
        iid=3,
        source_project_id=FORK_PROJECT_ID,
        source_path="mallory/widgets",
        labels=(),
        previous_labels=("ok-to-test",),
    )
    response = await gitlab_event(core, updated)
    assert "approval is revoked" in response["reason"]
    assert await core.pool.fetchval("SELECT count(*) FROM approvals") == 0


async def test_gitlab_bot_note_does_nothing(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    _, response = await note(
        core, fake_gitlab, "/retest", user_id=99, username="project_42_bot_5c1d"
    )
    assert response["chatops"]["outcome"] == "ignored"
    assert await run_count(core) == 0


async def test_gitlab_token_user_note_does_nothing(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    # A personal token's user has an ordinary username, unlike project and group bots.
    fake_gitlab.bot_user = {"id": 150, "username": "kubeci", "name": "KubeCI"}
    fake_gitlab.set_member(PROJECT_ID, 150, 40)
    serve_mr(fake_gitlab, pipeline(fake_target))
    _, response = await note(core, fake_gitlab, "/retest", user_id=150, username="kubeci")
    assert response["chatops"]["outcome"] == "ignored"
    assert "own GitLab account" in response["chatops"]["reason"]
    assert await run_count(core) == 0


async def test_gitlab_token_user_read_once(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    await note(core, fake_gitlab, "/help", user_id=GL_WRITER_ID, username="alice")
    await note(core, fake_gitlab, "/help", user_id=GL_WRITER_ID, username="alice")
    assert len(fake_gitlab.requests_to("user.get")) == 1


async def test_gitlab_token_user_failure_still_acts(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    fake_gitlab.script("user.get", Scripted(502))
    _, response = await note(core, fake_gitlab, "/retest", user_id=GL_WRITER_ID, username="alice")
    assert len(run_ids(response)) == 1


async def test_gitlab_note_without_commands_reads_nothing(
    core: Harness, fake_gitlab: FakeGitLab
) -> None:
    _, response = await note(core, fake_gitlab, "LGTM", user_id=GL_WRITER_ID, username="alice")
    assert response["chatops"]["outcome"] == "no_commands"
    assert fake_gitlab.requests_to("user.get") == []


async def test_gitlab_edited_note_does_nothing(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    payload = p.gitlab_note(body="/retest", action="update")
    response = await gitlab_event(core, payload)
    assert response["outcome"] == "ignored"
    assert await run_count(core) == 0


async def test_gitlab_issue_note_does_nothing(core: Harness, fake_gitlab: FakeGitLab) -> None:
    response = await gitlab_event(core, p.gitlab_note(body="/retest", noteable_type="Issue"))
    assert response["outcome"] == "ignored"
    assert fake_gitlab.requests == []
