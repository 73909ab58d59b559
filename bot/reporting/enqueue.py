"""Outbox rows for forge reports, written on the caller's connection and transaction.

Nothing here calls a forge: the rows commit with the change they report, and the
forge sinks (`bot.reporting.sinks`) deliver them later. Callers: the reporter hook,
webhook intake (configuration errors, statuses of runs waiting for `/ok-to-test`) and
chat-ops (replies, reactions, summary refreshes).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from bot.config import Settings
from bot.forges import github
from bot.forges.models import StatusState
from bot.outbox.sender import enqueue
from bot.reporting.payloads import (
    STATUS_STATES,
    CheckRunPayload,
    ReactionPayload,
    ReplyPayload,
    StatusPayload,
    SummaryPayload,
)
from bot.reporting.summary import PROBLEMS_MAX_CHARS, record_config_error
from bot.reporting.targets import Target
from bot.reporting.texts import code_block, short_sha, shorten, status_description_limit
from bot.store.db import Connection
from pipelines_schema.problems import Problem

log = logging.getLogger(__name__)

CONFIG_CONTEXT = "kubeci/config"
# Longest check run title KubeCI writes: the length of a GitHub status description.
CHECK_TITLE_MAX_CHARS = 140

# True when the current transaction already inserted a pending row for this sink key.
# Such a row is not yet visible to any sender, so a second one would add nothing.
_PENDING_IN_THIS_TRANSACTION = """
SELECT EXISTS (
    SELECT 1 FROM outbox WHERE ordering_key = $1 AND sink_key = $2 AND state = 'pending'
      AND xmin = pg_current_xact_id()::xid
)
"""


class TriggerLike(Protocol):
    """The trigger fields a report needs; `bot.intake.events.Trigger` has them."""

    @property
    def forge(self) -> str: ...

    @property
    def repository(self) -> str: ...

    @property
    def sha(self) -> str: ...

    @property
    def pr_number(self) -> int | None: ...

    def source(self) -> Mapping[str, Any]: ...


# Used by the reporter and by the public functions below.


async def add_status(
    conn: Connection,
    target: Target,
    *,
    sha: str,
    context: str,
    state: StatusState,
    description: str,
    target_url: str | None,
    run_id: int | None = None,
) -> None:
    """Insert a commit status row; the description is cut to the forge's limit."""
    payload: StatusPayload = {
        **target.payload(),
        "sha": sha,
        "context": context,
        "state": state,
        "description": shorten(description, status_description_limit(target.forge)),
        "target_url": target_url,
    }
    await enqueue(
        conn,
        kind=target.kind("status"),
        ordering_key=target.ordering_key,
        sink_key=target.status_key(sha, context),
        payload=dict(payload),
        run_id=run_id,
    )


async def add_check_run(
    conn: Connection, target: Target, payload: CheckRunPayload, run_id: int | None = None
) -> None:
    await enqueue(
        conn,
        kind=target.kind("check_run"),
        ordering_key=target.ordering_key,
        sink_key=target.check_key(payload["sha"], payload["name"]),
        payload=dict(payload),
        run_id=run_id,
    )


async def add_summary_refresh(
    conn: Connection,
    target: Target,
    pr_number: int,
    *,
    base_url: str | None,
    run_id: int | None = None,
) -> None:
    """Insert a summary refresh row, unless this transaction inserted one already.

    The comment is rendered when the row is sent, so one row per transaction shows
    everything the transaction changed.
    """
    sink_key = target.comment_key(pr_number)
    if await conn.fetchval(_PENDING_IN_THIS_TRANSACTION, target.ordering_key, sink_key):
        return
    payload: SummaryPayload = {**target.payload(), "pr_number": pr_number, "base_url": base_url}
    await enqueue(
        conn,
        kind=target.kind("comment"),
        ordering_key=target.ordering_key,
        sink_key=sink_key,
        payload=dict(payload),
        run_id=run_id,
    )


# Public functions for intake and chat-ops.


async def enqueue_status(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    sha: str,
    context: str,
    state: StatusState,
    description: str,
    target_url: str | None,
    source: Mapping[str, Any],
) -> None:
    """Queue commit status `context` = `state` on `sha`.

    `state` is one of pending, running, success, failure, error, canceled; each forge
    client maps it to its own words. Raises ValueError for an unknown forge or state,
    or an empty SHA or context.
    """
    if state not in STATUS_STATES:
        raise ValueError(f"unknown status state {state!r}; use one of {sorted(STATUS_STATES)}")
    if not sha or not context:
        raise ValueError(f"invalid status: sha={sha!r} and {context=!r} must not be empty")
    await add_status(
        conn,
        Target.of(forge, repository, source),
        sha=sha,
        context=context,
        state=state,
        description=description,
        target_url=target_url,
    )


async def enqueue_reply(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    body: str,
    source: Mapping[str, Any],
) -> None:
    """Queue a new comment with `body` (Markdown) on a pull request or merge request."""
    if not body.strip():
        raise ValueError("invalid reply: the body is empty")
    target = Target.of(forge, repository, source)
    reply_id = uuid.uuid4().hex
    separator = "#" if target.forge == "github" else "!"
    payload: ReplyPayload = {
        **target.payload(),
        "pr_number": pr_number,
        "body": body,
        "marker": f"<!-- kubeci:reply:{reply_id} -->",
    }
    await enqueue(
        conn,
        kind=target.kind("reply"),
        ordering_key=target.ordering_key,
        sink_key=f"{target.forge}:reply:{target.project}{separator}{pr_number}:{reply_id}",
        payload=dict(payload),
    )


async def enqueue_reaction(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    comment_id: int,
    content: str,
    source: Mapping[str, Any],
    pr_number: int | None = None,
) -> None:
    """Queue a reaction to a comment: GitHub content such as `+1` or `eyes`, GitLab
    award emoji names such as `thumbsup`.

    GitLab reaches a note through its merge request, so GitLab needs `pr_number` (the
    MR iid), given here or as `source["pr_number"]`. Raises ValueError when it is
    missing or the GitHub content is not one GitHub accepts.
    """
    target = Target.of(forge, repository, source)
    if pr_number is None and isinstance(source.get("pr_number"), int):
        pr_number = source["pr_number"]
    if target.forge == "github" and content not in github.REACTIONS:
        choices = sorted(github.REACTIONS)
        raise ValueError(f"unknown GitHub reaction {content!r}; use one of {choices}")
    if target.forge == "gitlab" and pr_number is None:
        raise ValueError("missing merge request iid for a GitLab reaction; pass pr_number")
    if not content:
        raise ValueError("invalid reaction: the emoji name is empty")
    payload: ReactionPayload = {
        **target.payload(),
        "comment_id": comment_id,
        "content": content,
        "pr_number": pr_number,
    }
    await enqueue(
        conn,
        kind=target.kind("reaction"),
        ordering_key=target.ordering_key,
        sink_key=f"{target.forge}:reaction:{target.project}:{comment_id}:{content}",
        payload=dict(payload),
    )


async def enqueue_summary_refresh(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    source: Mapping[str, Any],
) -> None:
    """Queue a refresh of the pull request's summary comment from the database."""
    await add_summary_refresh(conn, Target.of(forge, repository, source), pr_number, base_url=None)


async def enqueue_config_error(
    conn: Connection,
    trigger_like: TriggerLike,
    problems: Sequence[Problem],
    run_url: str | None,
    *,
    settings: Settings,
) -> None:
    """Report an invalid pipeline file on the trigger's commit.

    Queues a failed `kubeci/config` report whose description names the first
    problem: a commit status, or a check run listing every problem when KubeCI runs as
    a GitHub App. For a pull request, the summary comment lists every problem.
    """
    target = Target.of(trigger_like.forge, trigger_like.repository, trigger_like.source())
    sha = trigger_like.sha
    first = problems[0].format() if problems else "the pipeline file is invalid"
    if not sha:
        log.warning(
            "invalid pipeline file not reported: the trigger has no commit SHA",
            extra={"repository": target.repository},
        )
    elif target.forge == "github" and settings.github_app_id:
        await add_check_run(conn, target, _config_check_run(target, sha, problems, first, run_url))
    else:
        await add_status(
            conn,
            target,
            sha=sha,
            context=CONFIG_CONTEXT,
            state="failure",
            description=first,
            target_url=run_url,
        )
    pr_number = trigger_like.pr_number
    if pr_number is None:
        return
    await record_config_error(
        conn,
        forge=target.forge,
        repository=target.repository,
        pr_number=pr_number,
        sha=sha,
        problems=problems,
        run_url=run_url,
    )
    await add_summary_refresh(conn, target, pr_number, base_url=settings.callback_base_url)


def _config_check_run(
    target: Target, sha: str, problems: Sequence[Problem], first: str, run_url: str | None
) -> CheckRunPayload:
    count = len(problems)
    noun = "problem" if count == 1 else "problems"
    listing = "\n".join(problem.format() for problem in problems)
    if len(listing) > PROBLEMS_MAX_CHARS:
        listing = listing[:PROBLEMS_MAX_CHARS].rsplit("\n", 1)[0] + "\n... more problems not shown"
    return {
        **target.payload(),
        "sha": sha,
        "name": CONFIG_CONTEXT,
        "phase": "complete",
        "details_url": run_url,
        "external_id": f"config:{sha}",
        "conclusion": "failure",
        "title": shorten(first, CHECK_TITLE_MAX_CHARS),
        "summary": f"The pipeline file at commit `{short_sha(sha)}` has {count} {noun}.",
        "text": code_block(listing) if listing else None,
    }
