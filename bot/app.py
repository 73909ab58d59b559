"""Application wiring: the database, the engine, the worker, the outbox sender and the
aiohttp application that serves webhooks, callbacks, run pages and health checks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from bot.actions.registry import build_actions
from bot.chatops import ChatOps, ForkTrustPolicy, chatops_sinks
from bot.config import Settings
from bot.engine.core import Engine
from bot.engine.events import EventHook
from bot.engine.worker import Worker
from bot.forges.clients import ForgeClients
from bot.intake.events import Trigger
from bot.intake.service import ConfigErrorCallback, Intake
from bot.net.secrets import SecretStore
from bot.net.sinks import Sink
from bot.notifiers import notifier_sinks
from bot.outbox.sender import OutboxSender
from bot.reporting import Reporter, enqueue_config_error, forge_sinks
from bot.store.db import Connection, create_pool, migrate
from bot.store.embedded import EmbeddedPostgres
from bot.web import callbacks, health, metrics, runs, webhooks
from bot.web.metrics import Metrics
from pipelines_schema.problems import Problem

log = logging.getLogger(__name__)

SERVICES_KEY: web.AppKey[Services] = web.AppKey("services")


@dataclass
class Services:
    """Everything a running KubeCI process shares between its parts."""

    settings: Settings
    pool: asyncpg.Pool
    engine: Engine
    worker: Worker
    sender: OutboxSender
    secrets: SecretStore
    forges: ForgeClients = field(kw_only=True)
    intake: Intake = field(kw_only=True)
    embedded: EmbeddedPostgres | None = None
    metrics: Metrics = field(default_factory=Metrics)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def start_background(self) -> None:
        self.background = [
            asyncio.create_task(self.worker.run(), name="worker"),
            asyncio.create_task(self.sender.run(), name="outbox-sender"),
        ]

    async def stop_background(self, grace_s: float = 10.0) -> None:
        await self.worker.stop(grace_s)
        self.sender.stop()
        # Once stopped, both loops end by themselves and release their LISTEN
        # connections. Cancelling a loop while it opens that connection would leak it.
        if self.background:
            _, still_running = await asyncio.wait(self.background, timeout=grace_s)
            for task in still_running:
                task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        self.background = []


async def open_database(settings: Settings) -> tuple[asyncpg.Pool, EmbeddedPostgres | None]:
    """Connect to DATABASE_URL, or start the embedded server; apply migrations."""
    embedded = None
    dsn = settings.database_url
    if not dsn:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres")
        dsn = await asyncio.to_thread(embedded.start)
    try:
        pool = await create_pool(dsn, min_size=1, max_size=max(10, settings.worker_concurrency))
        async with pool.acquire() as conn:
            await migrate(conn)
    except BaseException:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    return pool, embedded


def config_error_reporter(settings: Settings) -> ConfigErrorCallback:
    """Report an invalid pipeline file as a failed `kubeci/config` status and comment."""

    async def report(
        conn: Connection, trigger: Trigger, problems: list[Problem], run_url: str | None
    ) -> None:
        await enqueue_config_error(conn, trigger, problems, run_url, settings=settings)

    return report


async def build_services(
    settings: Settings,
    *,
    hooks: Sequence[EventHook] = (),
    extra_sinks: dict[str, Sink] | None = None,
) -> Services:
    pool, embedded = await open_database(settings)
    try:
        secrets = SecretStore.from_settings(settings)
        forges = ForgeClients(settings)
        engine = Engine(settings, hooks=[Reporter(settings).on_event, *hooks])
        worker = Worker(
            pool,
            engine,
            build_actions(settings),
            secrets,
            worker_id=settings.worker_id,
            concurrency=settings.worker_concurrency,
            lease_s=settings.lease_s,
            poll_interval_s=settings.poll_interval_s,
        )
        sinks: dict[str, Sink] = {
            **notifier_sinks(settings, secrets=secrets),
            **forge_sinks(pool, forges, settings),
            **chatops_sinks(forges),
            **(extra_sinks or {}),
        }
        sender = OutboxSender(pool, sinks, worker.worker_id, mask=secrets.mask)
        service_metrics = Metrics()
        intake = Intake(
            pool,
            engine,
            forges,
            settings,
            service_metrics,
            trust_policy=ForkTrustPolicy(pool, forges),
            comment_handler=ChatOps(pool, engine, forges, settings),
            on_config_error=config_error_reporter(settings),
        )
    except BaseException:
        # Nothing else owns the pool and the server yet: close them before giving up.
        await pool.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    return Services(
        settings,
        pool,
        engine,
        worker,
        sender,
        secrets,
        forges=forges,
        intake=intake,
        embedded=embedded,
        metrics=service_metrics,
    )


async def close_services(services: Services) -> None:
    await services.stop_background()
    await services.forges.close()
    await services.pool.close()
    if services.embedded is not None:
        await asyncio.to_thread(services.embedded.stop)


def create_app(services: Services, *, routes: Sequence[Any] = ()) -> web.Application:
    """Build the aiohttp application; each of `routes` adds further routes to it."""
    app = web.Application(client_max_size=services.settings.max_body_bytes)
    app[SERVICES_KEY] = services
    webhooks.add_routes(app, services.intake)
    callbacks.add_routes(app, services.engine, services.pool, services.secrets.mask)
    health.add_routes(app, services.pool)
    runs.add_routes(app, services.pool)
    metrics.add_routes(app, services.pool, services.metrics)
    for add_routes in routes:
        add_routes(app)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve `app` on host:port (0 picks a free port); yield the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        addresses = runner.addresses
        yield int(addresses[0][1]) if addresses else port
    finally:
        await runner.cleanup()


def with_bound_port(settings: Settings, port: int) -> Settings:
    """Settings whose callback URLs point at the port actually bound."""
    if settings.public_url:
        return dataclasses.replace(settings, port=port)
    return dataclasses.replace(settings, port=port, public_url=f"http://{settings.host}:{port}")
