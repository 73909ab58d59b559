"""The pipeline file at a pull request's head commit, and runs started from comments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.engine.core import Engine, RunRequest
from bot.forges.clients import ForgeClients
from bot.intake.events import Trigger
from bot.intake.service import read_pipeline_file
from bot.store.db import Connection
from pipelines_schema.loader import PipelineError, Problem, load_pipeline
from pipelines_schema.models import Pipeline


@dataclass(frozen=True)
class LoadedPipeline:
    """The pipeline file found at a commit: valid, invalid (with problems) or absent."""

    sha: str
    # "" when no pipeline file exists at `sha`.
    filename: str = ""
    pipeline: Pipeline | None = None
    problems: list[Problem] = field(default_factory=list)


class PipelineLoader:
    """Loader of the pipeline file at a trigger's commit, through the forge API."""

    def __init__(self, forges: ForgeClients) -> None:
        self.forges = forges

    async def load(self, trigger: Trigger) -> LoadedPipeline:
        """Read `.kubeci.yml` (else `.kubeci.yaml`) at the trigger's SHA and validate it.

        Raises ForgeError when the forge fails.
        """
        found = await read_pipeline_file(self.forges, trigger)
        if found is None:
            return LoadedPipeline(trigger.sha)
        filename, content = found
        try:
            pipeline = load_pipeline(content, filename)
        except PipelineError as exc:
            return LoadedPipeline(trigger.sha, filename, problems=exc.problems)
        return LoadedPipeline(trigger.sha, filename, pipeline)


def group_base(trigger: Trigger) -> str:
    """Build the superseding key of a trigger's runs: its PR/MR, else its ref.

    NOTE: this must build the same key as the webhook intake, so that comment runs
    and push runs of one pull request supersede each other. The intake keeps its copy
    private; tests/test_chatops.py checks that the two agree.
    """
    if trigger.pr_number is not None:
        return f"{trigger.forge}:{trigger.repository}#pr:{trigger.pr_number}"
    return f"{trigger.forge}:{trigger.repository}@{trigger.ref}"


async def start_run(
    conn: Connection,
    engine: Engine,
    trigger: Trigger,
    pipeline: Pipeline,
    *,
    labels: dict[str, Any],
    trusted: bool,
    only_jobs: Sequence[str],
    delivery_pk: int,
    supersede: bool = True,
) -> int:
    """Create a run of `only_jobs` for `trigger` in the caller's transaction.

    Without `supersede`, the run neither cancels older runs of the pull request nor
    gets cancelled by newer ones, because its jobs get no superseding key.
    """
    request = RunRequest(
        pipeline=pipeline,
        labels=labels,
        forge=trigger.forge,
        repository=trigger.repository,
        sha=trigger.sha,
        ref=trigger.ref,
        pr_number=trigger.pr_number,
        trusted=trusted,
        source=trigger.source(),
        delivery_pk=delivery_pk,
        group_base=group_base(trigger) if supersede else "",
        only_jobs=list(only_jobs),
    )
    return await engine.create_run(conn, request)
