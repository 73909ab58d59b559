"""A running KubeCI core for tests: engine, worker, outbox sender and the HTTP app,
on the test's database, with the real actions and sinks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bot.actions.base import Action
from bot.actions.registry import build_actions
from bot.app import Services, config_error_reporter, create_app, serving, with_bound_port
from bot.chatops import ChatOps, ForkTrustPolicy, chatops_sinks
from bot.config import Settings
from bot.engine.core import Engine, RunRequest
from bot.engine.events import EventHook
from bot.engine.worker import Worker
from bot.forges.clients import ForgeClients
from bot.intake.service import CommentHandler, ConfigErrorCallback, Intake, TrustPolicy
from bot.net.secrets import SecretStore
from bot.net.sinks import Sink
from bot.notifiers import notifier_sinks
from bot.outbox.sender import OutboxSender, RetryPolicy
from bot.reporting import Reporter, forge_sinks
from bot.web.metrics import Metrics
from pipelines_schema.loader import load_pipeline

FAST_RETRY = RetryPolicy(max_attempts=4, initial_s=0.05, factor=2.0, max_s=0.2)


@dataclass
class Harness:
    services: Services
    routes: list[Any] = field(default_factory=list)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.services.pool

    @property
    def engine(self) -> Engine:
        return self.services.engine

    @property
    def intake(self) -> Intake:
        return self.services.intake

    @property
    def base_url(self) -> str:
        """Base URL of the served application, on the port actually bound."""
        return self.engine.settings.callback_base_url

    async def start_run(
        self, pipeline_yaml: str, labels: Mapping[str, Any] | None = None, **request: Any
    ) -> int:
        pipeline = load_pipeline(pipeline_yaml)
        async with self.pool.acquire() as conn, conn.transaction():
            return await self.engine.create_run(
                conn, RunRequest(pipeline=pipeline, labels=dict(labels or {}), **request)
            )

    async def wait_run(self, run_id: int, timeout_s: float = 15.0) -> str:
        """Wait until the run ended and none of its attempts is active; return its state."""
        async with asyncio.timeout(timeout_s):
            while True:
                settled = await self.pool.fetchval(
                    "SELECT (SELECT state FROM runs WHERE id = $1) <> 'running'"
                    " AND NOT EXISTS (SELECT 1 FROM attempts a JOIN tasks t ON t.id = a.task_id"
                    "   WHERE t.run_id = $1 AND a.state IN ('queued', 'running', 'waiting'))",
                    run_id,
                )
                if settled:
                    return str(
                        await self.pool.fetchval("SELECT state FROM runs WHERE id = $1", run_id)
                    )
                await asyncio.sleep(0.05)

    async def wait_outbox(self, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while await self.pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'"):
                await asyncio.sleep(0.05)

    async def events(self, run_id: int) -> list[tuple[str, str, str]]:
        """(scope, event name, name of the job, step or task) in commit order."""
        rows = await self.pool.fetch(
            "SELECT e.scope, e.name, coalesce(t.name, s.name, j.name, 'run') AS what"
            " FROM events e LEFT JOIN jobs j ON j.id = e.job_id"
            " LEFT JOIN steps s ON s.id = e.step_id LEFT JOIN tasks t ON t.id = e.task_id"
            " WHERE e.run_id = $1 ORDER BY e.id",
            run_id,
        )
        return [(row["scope"], row["name"], row["what"]) for row in rows]

    async def state(self, table: str, run_id: int, name: str) -> asyncpg.Record:
        """The row of the job, step or task called `name` in the run."""
        queries = {
            "jobs": "SELECT * FROM jobs WHERE run_id = $1 AND name = $2",
            "steps": "SELECT s.* FROM steps s JOIN jobs j ON j.id = s.job_id"
            " WHERE j.run_id = $1 AND s.name = $2",
            "tasks": "SELECT * FROM tasks WHERE run_id = $1 AND name = $2",
        }
        row = await self.pool.fetchrow(queries[table], run_id, name)
        assert row is not None, f"no {table} row named {name} in run {run_id}"
        return row

    async def attempts(self, run_id: int, task: str) -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                "SELECT a.* FROM attempts a JOIN tasks t ON t.id = a.task_id"
                " WHERE t.run_id = $1 AND t.name = $2 ORDER BY a.number",
                run_id,
                task,
            )
        )


def fast_settings(database_dsn: str = "", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_dsn or None,
        "lease_s": 3.0,
        "poll_interval_s": 0.1,
        "host": "127.0.0.1",
        "port": 0,
    }
    values.update(overrides)
    return Settings(**values)


def forge_settings(
    database_dsn: str,
    github_api_url: str,
    gitlab_url: str,
    *,
    github_secret: str,
    gitlab_secret: str,
    **overrides: Any,
) -> Settings:
    """Fast settings for a service that talks to the fake GitHub and GitLab."""
    return fast_settings(
        database_dsn,
        github_api_url=github_api_url,
        github_token="ghp-test-token",
        github_webhook_secret=github_secret,
        gitlab_url=gitlab_url,
        gitlab_token="glpat-test-token",
        gitlab_webhook_secret=gitlab_secret,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_core(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    actions: Mapping[str, Action] | None = None,
    hooks: list[EventHook] | None = None,
    sinks: Mapping[str, Sink] | None = None,
    routes: list[Any] | None = None,
    start_worker: bool = True,
    trust_policy: TrustPolicy | None = None,
    comment_handler: CommentHandler | None = None,
    on_config_error: ConfigErrorCallback | None = None,
    reporting: bool = False,
    chatops: bool = False,
) -> AsyncIterator[Harness]:
    """Serve the app on a free port and run a worker and an outbox sender against `pool`.

    The webhook intake reads pipeline files through forge clients built from `settings`
    (point `github_api_url` and `gitlab_url` at the fakes). With `reporting`, runs report
    to the forges through the outbox as in `kubeci serve`. With `chatops`, comments run
    commands and untrusted pull requests wait for `/ok-to-test`, as in `kubeci serve`.
    Chat-ops replies and statuses reach the forge only with `reporting` as well.
    """
    secrets = SecretStore.from_settings(settings)
    forges = ForgeClients(settings)
    all_hooks = list(hooks or [])
    all_sinks = {**notifier_sinks(settings, secrets=secrets), **(sinks or {})}
    if reporting:
        all_hooks.insert(0, Reporter(settings).on_event)
        all_sinks.update(forge_sinks(pool, forges, settings))
        on_config_error = on_config_error or config_error_reporter(settings)
    engine = Engine(settings, hooks=all_hooks)
    worker = Worker(
        pool,
        engine,
        actions if actions is not None else build_actions(settings),
        secrets,
        concurrency=settings.worker_concurrency,
        lease_s=settings.lease_s,
        poll_interval_s=settings.poll_interval_s,
    )
    if chatops:
        all_sinks.update(chatops_sinks(forges))
        trust_policy = trust_policy or ForkTrustPolicy(pool, forges)
        comment_handler = comment_handler or ChatOps(pool, engine, forges, settings)
    sender = OutboxSender(
        pool, all_sinks, worker.worker_id, retry=FAST_RETRY, poll_interval_s=0.1, mask=secrets.mask
    )
    metrics = Metrics()
    intake = Intake(
        pool,
        engine,
        forges,
        settings,
        metrics,
        trust_policy=trust_policy,
        comment_handler=comment_handler,
        on_config_error=on_config_error,
    )
    services = Services(
        settings,
        pool,
        engine,
        worker,
        sender,
        secrets,
        forges=forges,
        intake=intake,
        metrics=metrics,
    )
    app = create_app(services, routes=routes or [])
    try:
        async with serving(app, settings.host, 0) as port:
            engine.settings = with_bound_port(settings, port)
            if start_worker:
                await services.start_background()
            try:
                yield Harness(services)
            finally:
                await services.stop_background(grace_s=1.0)
    finally:
        await forges.close()
