"""Chat-ops: act on the commands in a new pull request comment.

`ChatOps.handle_comment` is the comment handler of the webhook intake, which calls it
once the comment's delivery is stored. It works in two phases:

1. Forge reads, outside any transaction: the commenter's write access (one lookup),
   the pull request (head commit, labels, fork), the pipeline file at the head commit,
   and the pull request author's access when a run is started.
2. One transaction: claim the comment (`bot.chatops.claims`), cancel runs, create the
   run, and enqueue every forge write (label, statuses, reaction, reply) in the outbox,
   so they are sent once the commit holds. A comment that another webhook's delivery
   claimed first is not acted on again.

All commands of a comment run. The jobs that `/retest`, `/test` and `/ok-to-test` ask
for go into one run, and `/cancel` acts before that run starts, so it never cancels
the run its own comment started. A run on another head commit than the newest push's
supersedes nothing (see `_may_supersede`). A writer's `/retest` or `/test` also runs a
pull request that waits for approval, once and without secrets; only `/ok-to-test`
lets its later pushes run. An accepted command gets a reaction. Anything to explain (an unknown
or refused command, `/help`, nothing to do) goes into exactly one reply per comment.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bot.chatops import replies
from bot.chatops.access import AccessChecker, ForgeUser
from bot.chatops.approvals import record_approval
from bot.chatops.claims import claim_comment, is_claimed
from bot.chatops.outbox import enqueue_label
from bot.chatops.parse import Command, parse_commands
from bot.chatops.pipelines import LoadedPipeline, PipelineLoader, start_run
from bot.chatops.pulls import comment_labels, fetch_pull_request, pull_request_trigger
from bot.chatops.runs import (
    RETEST_STATES,
    active_run_ids,
    latest_job_states,
    newest_webhook_sha,
)
from bot.chatops.trust import untrusted_reason
from bot.config import ConfigError, Settings
from bot.engine.core import Engine
from bot.forges.clients import ForgeClients
from bot.forges.errors import ForgeConnectionError, ForgeError
from bot.forges.models import PullRequest
from bot.intake.events import NewComment, Trigger
from bot.reporting import enqueue_reaction, enqueue_reply, enqueue_status
from bot.store.db import Connection
from pipelines_schema.models import Pipeline
from pipelines_schema.rules import matches

log = logging.getLogger(__name__)

# Forge reads for one comment share this budget, because GitHub stops waiting for the
# webhook response after 10 s.
FORGE_BUDGET_S = 6.0
RUN_COMMANDS = frozenset({"retest", "test", "ok-to-test"})
REACTIONS = {"github": "+1", "gitlab": "thumbsup"}
DEADLOCK_ATTEMPTS = 3
# GitLab names the users of service accounts service_account_..., for example
# service_account_group_9_3f2a1b.
GITLAB_SERVICE_ACCOUNT_PREFIX = "service_account_"


@dataclass
class Plan:
    """A comment's commands, sorted out, with everything read from the forge."""

    comment: NewComment
    commands: list[Command]
    unknown: list[Command] = field(default_factory=list)
    refused: list[Command] = field(default_factory=list)
    accepted: list[Command] = field(default_factory=list)
    pr: PullRequest | None = None
    trigger: Trigger | None = None
    loaded: LoadedPipeline | None = None
    # The reason the pull request is untrusted, or None when trusted or not looked up.
    untrusted_reason: str | None = None

    def accepts(self, name: str) -> bool:
        return any(command.name == name for command in self.accepted)

    def accepted_named(self, name: str) -> list[Command]:
        return [command for command in self.accepted if command.name == name]


@dataclass
class Outcome:
    """The effects of a comment's transaction, and the paragraphs of the reply."""

    paragraphs: list[str] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    cancelled_run_ids: list[int] = field(default_factory=list)
    acted: bool = False
    # Another delivery of the same comment acted on it first, so this one did nothing.
    duplicate: bool = False


class ChatOps:
    """The comment handler of the webhook intake. Stateless apart from its clients."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        engine: Engine,
        forges: ForgeClients,
        settings: Settings,
        *,
        forge_budget_s: float = FORGE_BUDGET_S,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.forges = forges
        self.settings = settings
        self.pipelines = PipelineLoader(forges)
        self.forge_budget_s = forge_budget_s

    async def handle_comment(self, comment: NewComment, delivery_pk: int) -> dict[str, Any]:
        """Act on the commands of a stored comment; return fields for the webhook response.

        Raises asyncpg and OSError exceptions when the database fails.
        """
        commands, early_response = await self._screen(comment)
        if early_response is not None:
            return early_response
        try:
            plan = await self._plan_within_budget(comment, commands)
        except (ForgeError, ConfigError) as exc:
            return await self._report_forge_failure(comment, exc, delivery_pk)
        outcome = await self._apply_retrying_deadlocks(plan, delivery_pk)
        if outcome.duplicate:
            return self._duplicate(comment)
        log.info(
            "comment %d: %s accepted, %d refused, %d unknown; runs %s, cancelled %s",
            comment.comment_id,
            ", ".join(str(command) for command in plan.accepted) or "none",
            len(plan.refused),
            len(plan.unknown),
            outcome.run_ids,
            outcome.cancelled_run_ids,
            extra=_log_ids(comment),
        )
        return self._response(plan, outcome)

    async def _screen(self, comment: NewComment) -> tuple[list[Command], dict[str, Any] | None]:
        """Parse the comment's commands, or return the response when there is nothing to do."""
        skipped = self._skip_reason(comment)
        commands: list[Command] = []
        if skipped is None:
            commands = parse_commands(comment.body)
            if not commands:
                return commands, {"chatops": {"outcome": "no_commands"}}
            # Only a comment with commands costs a forge read.
            skipped = await self._own_gitlab_account_reason(comment)
        if skipped is not None:
            log.info("comment %d ignored: %s", comment.comment_id, skipped, extra=_log_ids(comment))
            return commands, {"chatops": {"outcome": "ignored", "reason": skipped}}
        # The fast check spares the forge reads; the claim in `_apply` decides for good.
        async with self.pool.acquire() as conn:
            if await is_claimed(conn, comment):
                return commands, self._duplicate(comment)
        return commands, None

    def _duplicate(self, comment: NewComment) -> dict[str, Any]:
        reason = f"comment {comment.comment_id} was acted on already, from another webhook"
        log.info("%s", reason, extra=_log_ids(comment))
        return {"chatops": {"outcome": "duplicate", "reason": reason}}

    def _skip_reason(self, comment: NewComment) -> str | None:
        if comment.author_is_bot:
            return "the author is a bot"
        if comment.forge == "gitlab" and comment.author.startswith(GITLAB_SERVICE_ACCOUNT_PREFIX):
            return "the author is a GitLab service account"
        login = self.settings.github_bot_login
        if comment.forge == "github" and login and comment.author.lower() == login.lower():
            return "the author is KubeCI's own account"
        if replies.is_kubeci_text(comment.body):
            return "KubeCI posted the comment"
        return None

    async def _own_gitlab_account_reason(self, comment: NewComment) -> str | None:
        """Return why the note is KubeCI's own, when its author is the GitLab token's user.

        A failed lookup is logged and counts as another author, because the marker
        check already ignores the notes KubeCI posts.
        """
        if comment.forge != "gitlab":
            return None
        try:
            async with asyncio.timeout(self.forge_budget_s):
                own = await self.forges.gitlab().current_user()
        except (ForgeError, ConfigError, TimeoutError) as exc:
            log.warning(
                "reading the GitLab token's user failed, so note %d is not checked against it: %s",
                comment.comment_id,
                exc,
                extra=_log_ids(comment),
            )
            return None
        if comment.author_id == own.id or comment.author.lower() == own.username.lower():
            return "the author is KubeCI's own GitLab account"
        return None

    # ---- phase 1: forge reads -----------------------------------------------------------

    async def _plan_within_budget(self, comment: NewComment, commands: list[Command]) -> Plan:
        try:
            async with asyncio.timeout(self.forge_budget_s):
                return await self._plan(comment, commands)
        except TimeoutError as exc:
            raise ForgeConnectionError(
                f"reading {comment.repository} for comment {comment.comment_id} took longer "
                f"than {self.forge_budget_s:g} s",
                forge=comment.forge,
            ) from exc

    async def _plan(self, comment: NewComment, commands: list[Command]) -> Plan:
        plan = Plan(comment, commands)
        plan.unknown = [command for command in commands if not command.known]
        known = [command for command in commands if command.known]
        restricted = [command for command in known if command.name != "help"]
        checker = AccessChecker(self.forges)
        writer = bool(restricted) and await checker.may_write(_commenter(comment))
        plan.accepted = [command for command in known if writer or command.name == "help"]
        plan.refused = [command for command in restricted if not writer]
        if not any(command.name != "cancel" for command in plan.accepted):
            return plan
        plan.pr = await fetch_pull_request(self.forges, comment)
        plan.trigger = pull_request_trigger(comment, plan.pr)
        plan.loaded = await self.pipelines.load(plan.trigger)
        wants_run = any(command.name in RUN_COMMANDS for command in plan.accepted)
        if wants_run and plan.pr.state == "open":
            plan.untrusted_reason = await untrusted_reason(checker, plan.trigger)
        return plan

    async def _report_forge_failure(
        self, comment: NewComment, exc: ForgeError | ConfigError, delivery_pk: int
    ) -> dict[str, Any]:
        """Reply that the comment was not acted on, and claim it.

        The reply asks for a new comment, so the comment is claimed as if handled: a
        second webhook of the same comment neither acts nor replies again.
        """
        log.error("comment %d not acted on: %s", comment.comment_id, exc, extra=_log_ids(comment))
        text = (
            f"KubeCI could not act on this comment because a request to {comment.forge} "
            f"failed: {exc}. Comment again once {comment.forge} responds."
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if not await claim_comment(conn, comment, delivery_pk):
                return self._duplicate(comment)
            await self._reply(conn, comment, [text])
        return {"chatops": {"outcome": "forge_unavailable", "error": str(exc)}}

    # ---- phase 2: one transaction -------------------------------------------------------

    async def _apply_retrying_deadlocks(self, plan: Plan, delivery_pk: int) -> Outcome:
        """Run `_apply` in a transaction, again when Postgres aborts it to break a deadlock.

        NOTE: cancelling runs can deadlock with a worker that ends a job of the same run
        at that moment, because of the engine's lock order on run and job rows. Postgres
        aborts one of the two transactions, so a retry succeeds.
        """
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    return await self._apply(conn, plan, delivery_pk)
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.warning(
                    "deadlock while acting on comment %d; retrying (attempt %d of %d)",
                    plan.comment.comment_id,
                    attempt + 1,
                    DEADLOCK_ATTEMPTS,
                    extra=_log_ids(plan.comment),
                )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _apply(self, conn: Connection, plan: Plan, delivery_pk: int) -> Outcome:
        outcome = Outcome()
        if not await claim_comment(conn, plan.comment, delivery_pk):
            outcome.duplicate = True
            return outcome
        if plan.unknown:
            outcome.paragraphs.append(replies.unknown_commands(plan.unknown))
        if plan.refused:
            outcome.paragraphs.append(replies.refusal(plan.refused, plan.comment.repository))
        if plan.accepts("cancel"):
            await self._cancel(conn, plan, outcome)
        if any(plan.accepts(name) for name in RUN_COMMANDS):
            await self._run_commands(conn, plan, outcome, delivery_pk)
        if plan.accepts("help"):
            outcome.paragraphs.append(replies.help_text(self._jobs_note(plan)))
        if outcome.acted:
            await enqueue_reaction(
                conn,
                forge=plan.comment.forge,
                repository=plan.comment.repository,
                comment_id=plan.comment.comment_id,
                content=REACTIONS[plan.comment.forge],
                source=_source(plan.comment),
            )
        if outcome.paragraphs:
            await self._reply(conn, plan.comment, outcome.paragraphs)
        return outcome

    async def _cancel(self, conn: Connection, plan: Plan, outcome: Outcome) -> None:
        comment = plan.comment
        reason = f"cancelled by {comment.author} with /cancel"
        run_ids = await active_run_ids(conn, comment.forge, comment.repository, comment.pr_number)
        for run_id in run_ids:
            if await self.engine.cancel_run(conn, run_id, reason=reason):
                outcome.cancelled_run_ids.append(run_id)
        if outcome.cancelled_run_ids:
            outcome.acted = True
        else:
            outcome.paragraphs.append("Nothing to cancel: no run of this pull request is active.")

    async def _run_commands(
        self, conn: Connection, plan: Plan, outcome: Outcome, delivery_pk: int
    ) -> None:
        assert plan.pr is not None
        assert plan.loaded is not None
        if plan.pr.state != "open":
            outcome.paragraphs.append(
                f"This pull request is {plan.pr.state}, so KubeCI starts no runs for it."
            )
            return
        if plan.accepts("ok-to-test"):
            await self._approve(conn, plan, outcome)

        if plan.loaded.pipeline is None:
            outcome.paragraphs.append(replies.pipeline_problem(plan.loaded))
            return
        jobs = await self._jobs_to_run(conn, plan, plan.loaded.pipeline, outcome)
        if not jobs:
            return

        assert plan.trigger is not None
        run_id = await start_run(
            conn,
            self.engine,
            plan.trigger,
            plan.loaded.pipeline,
            labels=comment_labels(plan.trigger, plan.comment),
            trusted=plan.untrusted_reason is None,
            only_jobs=jobs,
            delivery_pk=delivery_pk,
            supersede=await self._may_supersede(conn, plan, outcome),
        )
        outcome.run_ids.append(run_id)
        outcome.acted = True

    async def _may_supersede(self, conn: Connection, plan: Plan, outcome: Outcome) -> bool:
        """Tell whether the comment's run may cancel older runs of the pull request.

        The forge's API can return the previous head for a moment after a push, and a
        run on that head must not cancel the run of the push. So when the newest run a
        webhook started is on another commit, the comment's run supersedes nothing.
        """
        assert plan.trigger is not None
        trigger = plan.trigger
        newest_sha = await newest_webhook_sha(
            conn, trigger.forge, trigger.repository, plan.comment.pr_number
        )
        if newest_sha is None or newest_sha == trigger.sha:
            return True
        log.info(
            "comment %d runs %s without superseding: the newest push is %s",
            plan.comment.comment_id,
            trigger.sha,
            newest_sha,
            extra=_log_ids(plan.comment),
        )
        outcome.paragraphs.append(replies.stale_head(trigger.sha, newest_sha, trigger.forge))
        return False

    async def _jobs_to_run(
        self, conn: Connection, plan: Plan, pipeline: Pipeline, outcome: Outcome
    ) -> list[str]:
        """Return the requested jobs whose rules match, in pipeline order."""
        assert plan.pr is not None
        assert plan.trigger is not None
        trigger = plan.trigger
        states = await latest_job_states(
            conn, trigger.forge, trigger.repository, plan.pr.number, trigger.sha
        )
        selection = select_jobs(plan, [job.name for job in pipeline.jobs], states)
        outcome.paragraphs.extend(selection.paragraphs)

        labels = comment_labels(trigger, plan.comment)
        wanted = [job for job in pipeline.jobs if job.name in selection.jobs]
        matching = [job.name for job in wanted if matches(job.rules, labels)]
        # Only jobs named in /test get a word when their rules skip them, because
        # /test all and /retest leave jobs to their rules, as pushes do.
        skipped = [job.name for job in wanted if job.name not in matching]
        named_skipped = [name for name in skipped if name in selection.named]
        if named_skipped:
            outcome.paragraphs.append(replies.rules_do_not_match(named_skipped))
        return matching

    async def _approve(self, conn: Connection, plan: Plan, outcome: Outcome) -> None:
        assert plan.pr is not None
        assert plan.trigger is not None
        comment = plan.comment
        await record_approval(
            conn,
            forge=comment.forge,
            repository=comment.repository,
            pr_number=comment.pr_number,
            approved_by=comment.author,
            comment_id=comment.comment_id,
        )
        if replies.OK_TO_TEST_LABEL not in plan.pr.labels:
            await enqueue_label(
                conn,
                forge=comment.forge,
                repository=comment.repository,
                pr_number=comment.pr_number,
                label=replies.OK_TO_TEST_LABEL,
                source=_source(comment),
                requested_by=comment.comment_id,
            )
        if plan.untrusted_reason is not None:
            await enqueue_status(
                conn,
                forge=comment.forge,
                repository=comment.repository,
                sha=plan.trigger.sha,
                context=replies.OK_TO_TEST_CONTEXT,
                state="success",
                description=replies.approved_status(comment.author),
                target_url=None,
                source=_source(comment),
            )
        outcome.acted = True

    async def _reply(self, conn: Connection, comment: NewComment, paragraphs: list[str]) -> None:
        await enqueue_reply(
            conn,
            forge=comment.forge,
            repository=comment.repository,
            pr_number=comment.pr_number,
            body=replies.compose_reply(comment.author, paragraphs),
            source=_source(comment),
        )

    def _jobs_note(self, plan: Plan) -> str:
        if plan.loaded is None or plan.trigger is None:
            return ""
        if plan.loaded.pipeline is None:
            return replies.pipeline_problem(plan.loaded)
        names = [job.name for job in plan.loaded.pipeline.jobs]
        return replies.jobs_note(names, plan.loaded.filename, plan.trigger.sha)

    def _response(self, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        chatops = {
            "outcome": "acted" if outcome.acted else "replied",
            "accepted": [str(command) for command in plan.accepted],
            "refused": [str(command) for command in plan.refused],
            "unknown": [str(command) for command in plan.unknown],
            "cancelled_runs": outcome.cancelled_run_ids,
            "replied": bool(outcome.paragraphs),
        }
        runs = [{"id": run_id, "url": self.engine.run_url(run_id)} for run_id in outcome.run_ids]
        return {"chatops": chatops, "runs": runs}


@dataclass
class JobSelection:
    """The jobs a comment's run commands ask for, and what to tell about the rest."""

    jobs: set[str] = field(default_factory=set)
    # Jobs named explicitly with /test, whose skipped rules are worth a word.
    named: set[str] = field(default_factory=set)
    paragraphs: list[str] = field(default_factory=list)


def select_jobs(plan: Plan, pipeline_jobs: list[str], states: dict[str, str]) -> JobSelection:
    """Work out which jobs `/ok-to-test`, `/retest` and `/test` ask for.

    `states` maps job names to the state of their newest job on the head commit.
    """
    assert plan.trigger is not None
    selection = JobSelection()
    sha = replies.short_sha(plan.trigger.sha)
    if plan.accepts("ok-to-test"):
        if states:
            selection.paragraphs.append(replies.already_ran(sha))
        else:
            selection.jobs.update(pipeline_jobs)
    if plan.accepts("retest"):
        failed = [name for name in pipeline_jobs if states.get(name) in RETEST_STATES]
        if not states:
            selection.jobs.update(pipeline_jobs)
        elif failed:
            selection.jobs.update(failed)
        else:
            selection.paragraphs.append(replies.nothing_to_retest(sha))
    for command in plan.accepted_named("test"):
        _select_test_jobs(command, pipeline_jobs, selection)
    return selection


def _select_test_jobs(command: Command, pipeline_jobs: list[str], selection: JobSelection) -> None:
    names = command.argument.replace(",", " ").split()
    if not names:
        selection.paragraphs.append(replies.test_needs_job(pipeline_jobs))
        return
    if "all" in names:
        selection.jobs.update(pipeline_jobs)
        return
    unknown = [name for name in names if name not in pipeline_jobs]
    if unknown:
        selection.paragraphs.append(replies.unknown_jobs(unknown, pipeline_jobs))
        return
    selection.jobs.update(names)
    selection.named.update(names)


def _commenter(comment: NewComment) -> ForgeUser:
    return ForgeUser(
        forge=comment.forge,
        repository=comment.repository,
        login=comment.author,
        user_id=comment.author_id,
        project_id=comment.project_id,
        installation_id=comment.installation_id,
    )


def _source(comment: NewComment) -> dict[str, Any]:
    """Return the forge routing data of the comment's pull request, for outbox rows."""
    source: dict[str, Any] = {
        "forge": comment.forge,
        "repository": comment.repository,
        "pr_number": comment.pr_number,
    }
    if comment.installation_id is not None:
        source["installation_id"] = comment.installation_id
    if comment.project_id is not None:
        source["project_id"] = comment.project_id
    return source


def _log_ids(comment: NewComment) -> dict[str, Any]:
    return {"forge": comment.forge, "repository": comment.repository}
