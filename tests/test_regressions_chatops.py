"""Regressions in chat-ops and untrusted pull requests, each found by trying to break them.

A test marked xfail(strict=True) shows a bug that is still open: it fails today, and
CI turns red once the bug is fixed, so that the mark gets removed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot.chatops.parse import Command, parse_commands
from tests import payloads as p
from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab
from tests.fakes.kubernetes import FakeKubernetes
from tests.fakes.target import FakeTarget, Reply
from tests.harness import Harness, fast_settings, running_core
from tests.test_chatops import (
    FORK_PROJECT_ID,
    GITHUB_SECRET,
    SHA_1,
    SHA_2,
    build_pipeline,
    chatops_replies,
    comment,
    core,
    gitlab_event,
    note,
    open_pr,
    pipeline,
    post,
    run_count,
    run_ids,
    serve_mr,
    serve_pr,
)

__all__ = ["core"]

NS = "kubeci"


# ---- parsing ---------------------------------------------------------------------------


def test_parse_indented_code_block() -> None:
    body = "A maintainer would approve it with:\n\n    /ok-to-test\n"
    assert parse_commands(body) == []


def test_parse_pre_block() -> None:
    assert parse_commands("<pre>\n/cancel\n</pre>") == []


def test_parse_quote_continuation() -> None:
    # Markdown renders both lines inside one quote.
    assert parse_commands("> the old comment said\n/cancel") == []


def test_parse_many_commands_keeps_order() -> None:
    body = "\n".join(f"/x{index}" for index in range(3000)) + "\n/x0"
    commands = parse_commands(body)
    assert len(commands) == 3000
    assert commands[:2] == [Command("x0"), Command("x1")]


# ---- replies ---------------------------------------------------------------------------


async def test_long_reply_keeps_marker(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    # Without the marker KubeCI neither recognises its reply as its own nor finds it
    # when it retries a post whose response was lost.
    serve_pr(fake_github, pipeline(fake_target))
    await comment(core, "/test " + " ".join(f"j{index}" for index in range(12000)))
    await core.wait_outbox()
    (reply,) = chatops_replies(fake_github)
    assert "<!-- kubeci:reply:" in reply


async def test_comment_from_two_webhooks_acts_once(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    # A repository webhook and an organisation webhook both send the same comment,
    # each with its own delivery id.
    serve_pr(fake_github, pipeline(fake_target))
    payload = p.github_issue_comment(body="/test all\n/nope", author="maria", comment_id=8801)
    for _ in range(2):
        body, headers = p.github_request(
            payload, "issue_comment", secret=GITHUB_SECRET, delivery=str(uuid.uuid4())
        )
        await post(core, "github", body, headers)
    await core.wait_outbox()
    assert await run_count(core) == 1
    assert len(chatops_replies(fake_github)) == 1


# ---- bots ------------------------------------------------------------------------------


async def test_gitlab_service_account_note_does_nothing(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    serve_mr(fake_gitlab, pipeline(fake_target))
    # GitLab names the users of service accounts service_account_... This one is a
    # Developer, as an automation account would be.
    fake_gitlab.set_member(42, 120, 30)
    _, response = await note(
        core, fake_gitlab, "/retest", user_id=120, username="service_account_group_9_3f2a1b"
    )
    assert response["chatops"]["outcome"] == "ignored"


# ---- trust -----------------------------------------------------------------------------


async def test_reporter_labelled_fork_mr_waits(
    core: Harness, fake_gitlab: FakeGitLab, fake_target: FakeTarget
) -> None:
    # A Reporter (no write access) may label merge requests, their own from a fork too.
    serve_mr(fake_gitlab, pipeline(fake_target), author_id=8, fork=True, labels=("ok-to-test",))
    opened = p.gitlab_merge_request(
        "open",
        iid=3,
        source_project_id=FORK_PROJECT_ID,
        source_path="mallory/widgets",
        author_id=8,
        username="rita",
        labels=("ok-to-test",),
    )
    response = await gitlab_event(core, opened)
    assert response["outcome"] == "awaiting_approval"


async def test_comment_run_does_not_supersede_newer_head(
    core: Harness, fake_github: FakeGitHub, fake_target: FakeTarget
) -> None:
    fake_target.script("/build", Reply(delay_s=2.0), Reply(delay_s=0.1))
    text = build_pipeline(fake_target)
    (newer,) = run_ids(await open_pr(core, fake_github, text, action="synchronize", sha=SHA_2))
    # The forge's API still returns the previous head for a moment.
    serve_pr(fake_github, text, sha=SHA_1)
    await comment(core, "/test build")
    assert await core.wait_run(newer) == "succeeded"


# ---- secrets through Kubernetes --------------------------------------------------------


SECRET_JOB_PIPELINE = """
jobs:
  - name: steal
    steps:
      - name: run
        tasks:
          - name: env
            action: kubernetes_job
            timeout_s: 60
            arguments:
              manifest:
                apiVersion: batch/v1
                kind: Job
                spec:
                  template:
                    spec:
                      serviceAccountName: kubeci
                      restartPolicy: Never
                      containers:
                        - name: main
                          image: "busybox:1.36"
                          command: [env]
                          envFrom:
                            - secretRef: {name: kubeci-secrets}
"""


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    fake = FakeKubernetes(namespaces=(NS,))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def wait_for_job_or_end(harness: Harness, kube: FakeKubernetes, run_id: int) -> None:
    """Wait until the run created a Kubernetes Job, or ended without one."""
    async with asyncio.timeout(10):
        while not kube.requests_for("create", "jobs"):
            state = await harness.pool.fetchval("SELECT state FROM runs WHERE id = $1", run_id)
            if state != "running":
                return
            await asyncio.sleep(0.05)


async def test_untrusted_job_gets_no_kubernetes_secret(
    db: asyncpg.Pool, database_dsn: str, kube: FakeKubernetes, tmp_path: Path
) -> None:
    settings = fast_settings(
        database_dsn,
        backend="kubernetes",
        kubeconfig=str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        kube_namespace=NS,
    )
    async with running_core(db, settings) as harness:
        run_id = await harness.start_run(SECRET_JOB_PIPELINE, {"fork": "true"}, trusted=False)
        await wait_for_job_or_end(harness, kube, run_id)
    created: list[Any] = [request.body for request in kube.requests_for("create", "jobs")]
    assert "secretRef" not in str(created)
    assert "serviceAccountName" not in str(created)
