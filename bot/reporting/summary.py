"""The pull request summary comment, rendered from the database when it is sent.

One comment per pull request or merge request shows the latest state of every job on
the latest commit that ran. For each job name it shows the newest run on that commit,
so a `/retest` of one job keeps the others in view. When the pipeline file of a newer
commit was invalid, the comment lists its problems first. The comment starts with
`MARKER`, by which KubeCI finds it again to edit it in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bot.reporting.describe import job_description
from bot.reporting.outcomes import Excerpt, FailedTask, load_job_outcome
from bot.reporting.texts import code_block, format_duration, inline_code, short_sha
from bot.store.db import Connection
from pipelines_schema.problems import Problem

MARKER = "<!-- kubeci:summary -->"
COMMENT_EXCERPT = Excerpt(max_lines=20, max_chars=2000)
# Room for the job table with the failure details, and for problem lists. The rest is
# on the run page. GitHub stores at most 65,536 characters per comment.
RUN_SECTION_MAX_CHARS = 60_000
PROBLEMS_MAX_CHARS = 50_000


@dataclass(frozen=True)
class JobLine:
    name: str
    state: str
    run_id: int
    started_at: datetime | None
    finished_at: datetime | None
    failure: str
    failed_tasks: tuple[FailedTask, ...]


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    sha: str
    created_at: datetime
    jobs: tuple[JobLine, ...]


@dataclass(frozen=True)
class ConfigError:
    sha: str
    problems: tuple[dict[str, Any], ...]
    run_url: str | None
    created_at: datetime


@dataclass(frozen=True)
class Summary:
    run: RunSummary | None
    # Only set when newer than the run.
    config_error: ConfigError | None


async def record_config_error(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    sha: str,
    problems: Sequence[Problem],
    run_url: str | None,
) -> None:
    """Store the problems of a pull request's pipeline file, replacing earlier ones."""
    await conn.execute(
        "INSERT INTO config_errors (forge, repository, pr_number, sha, problems, run_url)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (forge, repository, pr_number) DO UPDATE SET sha = EXCLUDED.sha,"
        " problems = EXCLUDED.problems, run_url = EXCLUDED.run_url, created_at = now()",
        forge,
        repository,
        pr_number,
        sha,
        [problem.to_dict() for problem in problems],
        run_url,
    )


async def load_summary(
    conn: Connection, forge: str, repository: str, pr_number: int
) -> Summary | None:
    """Read what the summary comment shows; None when the pull request has nothing yet."""
    run = await conn.fetchrow(
        "SELECT id, sha, created_at FROM runs"
        " WHERE forge = $1 AND repository = $2 AND pr_number = $3 ORDER BY id DESC LIMIT 1",
        forge,
        repository,
        pr_number,
    )
    error = await conn.fetchrow(
        "SELECT sha, problems, run_url, created_at FROM config_errors"
        " WHERE forge = $1 AND repository = $2 AND pr_number = $3",
        forge,
        repository,
        pr_number,
    )
    if run is None and error is None:
        return None
    config_error = None
    if error is not None and (run is None or error["created_at"] > run["created_at"]):
        config_error = ConfigError(
            error["sha"], tuple(error["problems"]), error["run_url"], error["created_at"]
        )
    summary_run = None
    if run is not None:
        jobs = await _load_jobs(conn, forge, repository, pr_number, run["sha"])
        summary_run = RunSummary(run["id"], run["sha"], run["created_at"], jobs)
    return Summary(summary_run, config_error)


async def _load_jobs(
    conn: Connection, forge: str, repository: str, pr_number: int, sha: str
) -> tuple[JobLine, ...]:
    rows = await conn.fetch(
        "SELECT DISTINCT ON (j.name) j.id, j.name, j.state, j.position, j.run_id,"
        " j.started_at, j.finished_at FROM jobs j JOIN runs r ON r.id = j.run_id"
        " WHERE r.forge = $1 AND r.repository = $2 AND r.pr_number = $3 AND r.sha = $4"
        " ORDER BY j.name, j.run_id DESC",
        forge,
        repository,
        pr_number,
        sha,
    )
    lines = [await _job_line(conn, row) for row in sorted(rows, key=_job_order)]
    return tuple(lines)


def _job_order(row: asyncpg.Record) -> tuple[int, str]:
    return (row["position"], row["name"])


async def _job_line(conn: Connection, row: asyncpg.Record) -> JobLine:
    failure = ""
    failed_tasks: tuple[FailedTask, ...] = ()
    if row["state"] in ("failed", "cancelled"):
        outcome = await load_job_outcome(conn, row["id"], COMMENT_EXCERPT)
        failure = job_description(outcome)
        failed_tasks = outcome.failed_tasks
    return JobLine(
        row["name"],
        row["state"],
        row["run_id"],
        row["started_at"],
        row["finished_at"],
        failure,
        failed_tasks,
    )


# Rendering


def overall_state(states: Sequence[str]) -> str:
    """Return one word for a set of job states: running, failed, cancelled, ..."""
    if any(state in ("pending", "running") for state in states):
        return "running"
    for word in ("failed", "cancelled", "succeeded"):
        if word in states:
            return word
    return "skipped"


def render_summary(summary: Summary, base_url: str) -> str:
    """Render the comment body, Markdown that GitHub and GitLab both display."""
    parts = [MARKER]
    if summary.config_error is not None:
        parts.append(_config_error_section(summary.config_error))
        if summary.run is not None:
            parts.append(f"#### Previous run, at commit `{short_sha(summary.run.sha)}`")
    if summary.run is not None:
        parts.append(_run_section(summary.run, base_url, heading=summary.config_error is None))
    return "\n\n".join(parts) + "\n"


def _run_section(run: RunSummary, base_url: str, *, heading: bool) -> str:
    def run_url(run_id: int) -> str:
        return f"{base_url}/runs/{run_id}"

    state = overall_state([job.state for job in run.jobs])
    parts = []
    if heading:
        parts.append(f"### KubeCI: {state}")
    parts.append(
        f"Commit `{short_sha(run.sha)}`, run [{run.run_id}]({run_url(run.run_id)})."
        if run.jobs
        else f"Commit `{short_sha(run.sha)}`: the run has no jobs."
    )
    if run.jobs:
        rows = ["| Job | State | Duration |", "| --- | --- | --- |"]
        for job in run.jobs:
            duration = format_duration(job.started_at, job.finished_at)
            if job.state == "running":
                duration = "running"
            rows.append(f"| [{job.name}]({run_url(job.run_id)}) | {job.state} | {duration} |")
        parts.append("\n".join(rows))
    room_chars = RUN_SECTION_MAX_CHARS - sum(len(part) for part in parts)
    parts.extend(_failure_details(run.jobs, run_url(run.run_id), room_chars))
    return "\n\n".join(parts)


def _failure_details(jobs: Sequence[JobLine], page_url: str, max_chars: int) -> list[str]:
    sections: list[str] = []
    used_chars = 0
    for job in jobs:
        if not job.failure:
            continue
        blocks = [f"**{job.name}**: {inline_code(job.failure)}"]
        for task in job.failed_tasks:
            if task.log_tail:
                blocks.append(f"`{task.step}/{task.task}`:\n\n{code_block(task.log_tail)}")
        section = "\n\n".join(blocks)
        if used_chars + len(section) > max_chars:
            sections.append(f"More failures are on the [run page]({page_url}).")
            break
        sections.append(section)
        used_chars += len(section)
    return sections


def _config_error_section(error: ConfigError) -> str:
    count = len(error.problems)
    noun = "problem" if count == 1 else "problems"
    lines: list[str] = []
    used_chars = 0
    for index, problem in enumerate(error.problems):
        line = _format_problem(problem)
        if used_chars + len(line) > PROBLEMS_MAX_CHARS:
            lines.append(f"... {count - index} more {noun} not shown")
            break
        lines.append(line)
        used_chars += len(line) + 1
    parts = [
        "### KubeCI: invalid pipeline file",
        f"The pipeline file at commit `{short_sha(error.sha)}` has {count} {noun},"
        " so no job ran. Fix them and push again.",
        code_block("\n".join(lines)),
    ]
    if error.run_url:
        parts.append(f"[Details]({error.run_url})")
    return "\n\n".join(parts)


def _format_problem(data: dict[str, Any]) -> str:
    try:
        return Problem(
            str(data["file"]),
            int(data["line"]),
            int(data["column"]),
            str(data.get("path", "")),
            str(data["message"]),
        ).format()
    except (KeyError, TypeError, ValueError):
        return str(data)
