"""A worker in its own process, for tests that kill it: `python -m tests.worker_process DSN`.

Settings come from the environment (KUBECI_BACKEND, KUBECI_KUBECONFIG, ...), with a short
lease so that a killed worker's attempts are recovered quickly.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bot.actions.registry import build_actions
from bot.config import Settings
from bot.engine.core import Engine
from bot.engine.worker import Worker
from bot.net.secrets import SecretStore
from bot.store.db import create_pool
from tests.harness import fast_settings


async def main(dsn: str) -> None:
    from_env = Settings.from_env()
    settings = fast_settings(
        dsn,
        lease_s=1.5,
        backend=from_env.backend,
        kubeconfig=from_env.kubeconfig,
        kube_namespace=from_env.kube_namespace,
    )
    pool = await create_pool(dsn)
    worker = Worker(
        pool,
        Engine(settings),
        build_actions(settings),
        SecretStore.from_settings(settings),
        worker_id="doomed-worker",
        lease_s=settings.lease_s,
        poll_interval_s=0.1,
    )
    print("worker ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(sys.argv[1]))
