"""The reporter: an engine event hook that reports jobs to GitHub and GitLab.

For every job of a run triggered from a forge, it reports a commit status named
`kubeci/<job>` on the run's own commit: running when the job starts, the outcome when
it completes. When KubeCI runs as a GitHub App, check runs take the place of statuses.
Job starts and completions, and the run's completion, refresh the pull request's
summary comment. Everything is written as outbox rows in the event's transaction.
"""

from __future__ import annotations

import logging

from bot.config import Settings
from bot.engine.events import Event, RunInfo
from bot.reporting.describe import check_conclusion, job_description, status_state
from bot.reporting.enqueue import (
    CHECK_TITLE_MAX_CHARS,
    add_check_run,
    add_status,
    add_summary_refresh,
)
from bot.reporting.outcomes import Excerpt, JobOutcome, load_job_outcome
from bot.reporting.payloads import CheckRunPayload
from bot.reporting.targets import FORGES, Target
from bot.reporting.texts import code_block, format_duration, inline_code, short_sha, shorten
from bot.store.db import Connection

log = logging.getLogger(__name__)

CONTEXT_PREFIX = "kubeci/"
# GitHub accepts at most 65,535 characters of check run output text; five tails fit.
CHECK_EXCERPT = Excerpt(max_lines=200, max_chars=10_000)


def job_context(job: str) -> str:
    return f"{CONTEXT_PREFIX}{job}"


def runs_base_url(run: RunInfo) -> str | None:
    """Return the base of run page URLs (`<base>/runs/<id>`) from the run's own URL."""
    suffix = f"/runs/{run.id}"
    return run.url.removesuffix(suffix) if run.url.endswith(suffix) else None


class Reporter:
    """Writes forge reports for engine events. Stateless apart from the settings."""

    def __init__(self, settings: Settings) -> None:
        # A GitHub App reports jobs as check runs; a personal token as commit statuses.
        self._check_runs = bool(settings.github_app_id)

    async def on_event(self, conn: Connection, event: Event, run: RunInfo) -> None:
        """Queue the reports for `event`; an `EventHook` for the engine."""
        if run.forge not in FORGES or not run.repository:
            return
        target = Target.of(run.forge, run.repository, run.source)
        if event.scope == "job" and event.name == "started" and event.job:
            await self._job_started(conn, target, event.job, run)
        elif event.scope == "job" and event.name == "complete" and event.job_id is not None:
            outcome = await load_job_outcome(conn, event.job_id, CHECK_EXCERPT)
            await self._job_complete(conn, target, outcome, run)
        elif not (event.scope == "run" and event.name == "complete"):
            return
        if run.pr_number is not None:
            await add_summary_refresh(
                conn, target, run.pr_number, base_url=runs_base_url(run), run_id=run.id
            )

    def _uses_check_runs(self, target: Target) -> bool:
        return self._check_runs and target.forge == "github"

    async def _job_started(self, conn: Connection, target: Target, job: str, run: RunInfo) -> None:
        if not run.sha:
            return
        if self._uses_check_runs(target):
            payload: CheckRunPayload = {
                **target.payload(),
                "sha": run.sha,
                "name": job_context(job),
                "phase": "start",
                "details_url": run.url,
                "external_id": f"run:{run.id}:job:{job}",
                "conclusion": None,
                "title": "running",
                "summary": f"Run [{run.id}]({run.url}) is running job `{job}`.",
                "text": None,
            }
            await add_check_run(conn, target, payload, run.id)
            return
        await add_status(
            conn,
            target,
            sha=run.sha,
            context=job_context(job),
            state="running",
            description=f"running (run {run.id})",
            target_url=run.url,
            run_id=run.id,
        )

    async def _job_complete(
        self, conn: Connection, target: Target, outcome: JobOutcome, run: RunInfo
    ) -> None:
        if not run.sha:
            return
        description = job_description(outcome)
        log.debug(
            "reporting job %s: %s",
            outcome.name,
            description,
            extra={"run_id": run.id, "repository": run.repository},
        )
        if self._uses_check_runs(target):
            await add_check_run(conn, target, _finished_check_run(target, outcome, run), run.id)
            return
        await add_status(
            conn,
            target,
            sha=run.sha,
            context=job_context(outcome.name),
            state=status_state(outcome.state),
            description=description,
            target_url=run.url,
            run_id=run.id,
        )


def _finished_check_run(target: Target, outcome: JobOutcome, run: RunInfo) -> CheckRunPayload:
    description = job_description(outcome)
    duration = format_duration(outcome.started_at, outcome.finished_at)
    summary = f"Job `{outcome.name}` {outcome.state}"
    summary += f" after {duration}" if duration else ""
    summary += f" in run [{run.id}]({run.url}) on commit `{short_sha(run.sha)}`."
    if outcome.state != "succeeded":
        summary += f"\n\n{inline_code(description)}"
    sections = [
        f"### {task.step}/{task.task}\n\n{inline_code(task.message)}\n\n{code_block(task.log_tail)}"
        for task in outcome.failed_tasks
        if task.log_tail
    ]
    return {
        **target.payload(),
        "sha": run.sha,
        "name": job_context(outcome.name),
        "phase": "complete",
        "details_url": run.url,
        "external_id": f"run:{run.id}:job:{outcome.name}",
        "conclusion": check_conclusion(outcome.state),
        "title": shorten(description, CHECK_TITLE_MAX_CHARS),
        "summary": summary,
        "text": "\n\n".join(sections) or None,
    }
