"""`GET /metrics`: Prometheus metrics.

Counters (deliveries) are per process. Gauges of shared state (runs by state, outbox
backlog) are read from the database at scrape time, so every process reports the same.
"""

from __future__ import annotations

import logging

import asyncpg
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from bot.store.db import DB_ERRORS

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "kubeci_deliveries",
            "Webhook deliveries received, by forge, event and outcome",
            ["forge", "event", "outcome"],
            registry=self.registry,
        )
        self.runs = Gauge(
            "kubeci_runs", "Runs in the database, by state", ["state"], registry=self.registry
        )
        self.outbox_backlog = Gauge(
            "kubeci_outbox_backlog", "Outbox rows waiting to be sent", registry=self.registry
        )
        self.outbox_oldest_age = Gauge(
            "kubeci_outbox_oldest_age_seconds",
            "Age of the oldest outbox row waiting to be sent",
            registry=self.registry,
        )
        self.outbox_dead = Gauge(
            "kubeci_outbox_dead",
            "Outbox rows given up after their last retry",
            registry=self.registry,
        )

    async def refresh(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            states = await conn.fetch("SELECT state, count(*) AS n FROM runs GROUP BY state")
            backlog = await conn.fetchrow(
                "SELECT count(*) AS n,"
                " coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age_s"
                " FROM outbox WHERE state = 'pending'"
            )
            dead = await conn.fetchval("SELECT count(*) FROM outbox WHERE state = 'dead'")
        for state in ("running", "succeeded", "failed", "cancelled"):
            self.runs.labels(state).set(0)
        for row in states:
            self.runs.labels(row["state"]).set(row["n"])
        assert backlog is not None
        self.outbox_backlog.set(backlog["n"])
        self.outbox_oldest_age.set(float(backlog["age_s"]))
        self.outbox_dead.set(dead)


METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics")


def add_routes(app: web.Application, pool: asyncpg.Pool, metrics: Metrics) -> None:
    app[METRICS_KEY] = metrics

    async def handle(_request: web.Request) -> web.Response:
        try:
            await metrics.refresh(pool)
        except DB_ERRORS as exc:
            log.warning("metrics: database gauges not refreshed: %s", exc)
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", handle)
