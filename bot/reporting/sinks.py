"""Outbox sinks that deliver reports to GitHub and GitLab.

Forge errors map to outbox outcomes:
- a rate limit (429, GitHub's secondary-limit 403, an exhausted `x-ratelimit-remaining`)
  is retried after the wait the forge requested;
- 5xx, connection errors and timeouts are retried with the sender's backoff;
- authentication errors are retried `AUTH_ATTEMPTS_MAX` times, so that a refreshed
  token gets its chance, and then the row is dead;
- any other 4xx, an unreadable response or a malformed row is dead at once, with the
  message.
A dead report never changes a run.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import asyncpg

from bot.config import Settings
from bot.forges.clients import ForgeClients
from bot.forges.errors import ForgeAuthError, ForgeError, ForgeNotFound, ForgeRateLimited
from bot.forges.github import CheckConclusion, CheckOutput, GitHubClient
from bot.forges.gitlab import GitLabClient
from bot.net.sinks import OutboxRow, Sink, SinkOutcome, SinkState, payload_hash
from bot.reporting.comments import CommentThread, thread_for
from bot.reporting.payloads import read, read_optional, read_status_state
from bot.reporting.summary import MARKER, load_summary, render_summary
from bot.reporting.targets import (
    GITHUB_CHECK_RUN,
    GITHUB_COMMENT,
    GITHUB_REACTION,
    GITHUB_REPLY,
    GITHUB_STATUS,
    GITLAB_COMMENT,
    GITLAB_REACTION,
    GITLAB_REPLY,
    GITLAB_STATUS,
    Target,
)
from bot.reporting.texts import marked_comment

log = logging.getLogger(__name__)

# Attempts of a row whose calls fail authentication, before it goes dead.
AUTH_ATTEMPTS_MAX = 3


def outcome_for_error(error: Exception, row: OutboxRow) -> SinkOutcome:
    """Map a forge error (or a ValueError about the row or settings) to an outcome."""
    message = str(error)
    if isinstance(error, ForgeRateLimited):
        return SinkOutcome.retry(message, retry_after_s=error.retry_after_s)
    if isinstance(error, ForgeAuthError):
        if row.attempts < AUTH_ATTEMPTS_MAX:
            return SinkOutcome.retry(message)
        return SinkOutcome.dead(
            f"{message}; gave up after {row.attempts} attempts: check the token and its permissions"
        )
    if isinstance(error, ForgeError) and error.transient:
        return SinkOutcome.retry(message)
    return SinkOutcome.dead(message)


async def _guarded(row: OutboxRow, send: Callable[[], Awaitable[SinkOutcome]]) -> SinkOutcome:
    try:
        return await send()
    except (ForgeError, ValueError) as error:
        # ValueError: a malformed row, or missing forge settings (ConfigError).
        return outcome_for_error(error, row)


class _ForgeSink:
    def __init__(self, forges: ForgeClients) -> None:
        self._forges = forges

    async def send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        return await _guarded(row, lambda: self._send(row, state))

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        raise NotImplementedError

    def _github(self, target: Target) -> GitHubClient:
        client = self._forges.github()
        if target.installation_id is not None:
            client.remember_installation(target.repository, target.installation_id)
        return client

    def _gitlab(self) -> GitLabClient:
        return self._forges.gitlab()

    def _thread(self, target: Target, pr_number: int) -> CommentThread:
        client = self._github(target) if target.forge == "github" else self._gitlab()
        return thread_for(client, target.project, pr_number)


class StatusSink(_ForgeSink):
    """Sets a commit status (`github.status`, `gitlab.status`)."""

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        sha = read(row.payload, "sha", str)
        context = read(row.payload, "context", str)
        status = read_status_state(row.payload)
        description = read(row.payload, "description", str)
        target_url = read_optional(row.payload, "target_url", str)
        if target.forge == "github":
            await self._github(target).create_status(
                target.repository, sha, status, context, description, target_url
            )
        else:
            await self._gitlab().create_status(
                target.project, sha, status, context, description, target_url
            )
        return SinkOutcome.sent(f"{context}={status} on {sha}")


class CheckRunSink(_ForgeSink):
    """Creates and completes GitHub check runs (`github.check_run`).

    A `start` row creates a check run and keeps its id as the sink key's remote id. A
    `complete` row updates that check run, or creates a finished one when there is none.
    """

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        client = self._github(target)
        check = _CheckRun.read(row.payload)
        existing = state.remote_id if state is not None else None
        if check.phase == "complete" and existing is not None and existing.isdigit():
            try:
                await client.update_check_run(
                    target.repository,
                    int(existing),
                    status="completed",
                    conclusion=check.conclusion,
                    details_url=check.details_url,
                    output=check.output,
                )
                return SinkOutcome.sent(f"completed check run {existing}", remote_id=existing)
            except ForgeNotFound:
                log.info(
                    "check run %s no longer exists; creating a finished one",
                    existing,
                    extra={"outbox_id": row.id, "repository": target.repository},
                )
        check_run_id = await client.create_check_run(
            target.repository,
            check.sha,
            check.name,
            status="in_progress" if check.phase == "start" else "completed",
            conclusion=check.conclusion if check.phase == "complete" else None,
            details_url=check.details_url,
            external_id=check.external_id,
            output=check.output,
        )
        return SinkOutcome.sent(f"created check run {check_run_id}", remote_id=str(check_run_id))


@dataclass(frozen=True)
class _CheckRun:
    """The fields of a `github.check_run` row, checked."""

    sha: str
    name: str
    phase: str
    conclusion: CheckConclusion | None
    details_url: str | None
    external_id: str
    output: CheckOutput

    @classmethod
    def read(cls, payload: Mapping[str, Any]) -> _CheckRun:
        return cls(
            sha=read(payload, "sha", str),
            name=read(payload, "name", str),
            phase=read(payload, "phase", str),
            conclusion=_read_conclusion(payload),
            details_url=read_optional(payload, "details_url", str),
            external_id=read(payload, "external_id", str),
            output=CheckOutput(
                title=read(payload, "title", str),
                summary=read(payload, "summary", str),
                text=read_optional(payload, "text", str),
            ),
        )


def _read_conclusion(payload: Mapping[str, Any]) -> CheckConclusion | None:
    conclusion = read_optional(payload, "conclusion", str)
    if conclusion is not None and conclusion not in get_args(CheckConclusion):
        raise ValueError(f"the outbox payload has an unknown check run conclusion {conclusion!r}")
    checked: CheckConclusion | None = conclusion  # type: ignore[assignment]
    return checked


class SummarySink(_ForgeSink):
    """Creates or edits the summary comment of a pull request (`*.comment`).

    The body is rendered from the database at send time. When it matches what the
    comment last received, nothing is sent, so a burst of refreshes costs one edit.
    Only a comment that KubeCI's own account wrote is adopted as the summary, so a
    user's comment that quotes the marker is never overwritten.
    """

    def __init__(self, pool: asyncpg.Pool, forges: ForgeClients, settings: Settings) -> None:
        super().__init__(forges)
        self._pool = pool
        self._settings = settings

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        pr_number = read(row.payload, "pr_number", int)
        base_url = read_optional(row.payload, "base_url", str) or self._settings.callback_base_url
        async with self._pool.acquire() as conn:
            summary = await load_summary(conn, target.forge, target.repository, pr_number)
        if summary is None:
            return SinkOutcome.skipped("the pull request has no run or pipeline error to show")
        body = render_summary(summary, base_url)
        body_hash = payload_hash(body)
        if state is not None and state.payload_hash == body_hash:
            return SinkOutcome.skipped("the comment already shows this state")
        thread = self._thread(target, pr_number)
        comment_id = _remote_comment_id(state) or await thread.find(
            MARKER, await thread.own_login()
        )
        if comment_id is not None:
            try:
                await thread.edit(comment_id, body)
                return SinkOutcome.sent(
                    f"edited comment {comment_id}",
                    remote_id=str(comment_id),
                    payload_hash=body_hash,
                )
            except ForgeNotFound:
                log.info(
                    "summary comment %s was deleted; creating a new one",
                    comment_id,
                    extra={"outbox_id": row.id, "repository": target.repository},
                )
        created = await thread.create(body)
        return SinkOutcome.sent(
            f"created comment {created}", remote_id=str(created), payload_hash=body_hash
        )


def _remote_comment_id(state: SinkState | None) -> int | None:
    if state is None or state.remote_id is None or not state.remote_id.isdigit():
        return None
    return int(state.remote_id)


class ReplySink(_ForgeSink):
    """Posts a new comment for chat-ops (`*.reply`).

    The body starts with a hidden marker, and a reply too long for the forge is cut
    after it. A retry first looks for the marker among KubeCI's own comments, so a reply
    whose response was lost is not posted twice.
    """

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        pr_number = read(row.payload, "pr_number", int)
        marker = read(row.payload, "marker", str)
        body = marked_comment(marker, read(row.payload, "body", str), target.forge)
        thread = self._thread(target, pr_number)
        if row.attempts > 1:
            found = await thread.find(marker, await thread.own_login(), anywhere=True)
            if found is not None:
                return SinkOutcome.sent(f"reply {found} was already posted", remote_id=str(found))
        created = await thread.create(body)
        return SinkOutcome.sent(f"posted reply {created}", remote_id=str(created))


class ReactionSink(_ForgeSink):
    """Adds a reaction (GitHub) or award emoji (GitLab) to a comment (`*.reaction`)."""

    async def _send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        comment_id = read(row.payload, "comment_id", int)
        content = read(row.payload, "content", str)
        if target.forge == "github":
            await self._github(target).add_reaction(target.repository, comment_id, content)
        else:
            pr_number = read(row.payload, "pr_number", int)
            await self._gitlab().award_emoji(target.project, pr_number, comment_id, content)
        return SinkOutcome.sent(f"reacted {content} to comment {comment_id}")


def forge_sinks(pool: asyncpg.Pool, forges: ForgeClients, settings: Settings) -> dict[str, Sink]:
    """Return the report sinks by outbox kind, for `OutboxSender`."""
    statuses = StatusSink(forges)
    summaries = SummarySink(pool, forges, settings)
    replies = ReplySink(forges)
    reactions = ReactionSink(forges)
    return {
        GITHUB_STATUS: statuses,
        GITHUB_CHECK_RUN: CheckRunSink(forges),
        GITHUB_COMMENT: summaries,
        GITHUB_REPLY: replies,
        GITHUB_REACTION: reactions,
        GITLAB_STATUS: statuses,
        GITLAB_COMMENT: summaries,
        GITLAB_REPLY: replies,
        GITLAB_REACTION: reactions,
    }
