"""`kubeci serve` and `kubeci migrate`."""

from __future__ import annotations

import asyncio
import logging
import signal

from bot.app import build_services, close_services, create_app, open_database, serving
from bot.config import Settings

log = logging.getLogger(__name__)


def warn_about_webhook_secrets(settings: Settings) -> None:
    """Log which forges' webhooks will all be rejected because no secret is set."""
    secrets = {
        "GitHub": ("KUBECI_GITHUB_WEBHOOK_SECRET", settings.github_webhook_secret),
        "GitLab": ("KUBECI_GITLAB_WEBHOOK_SECRET", settings.gitlab_webhook_secret),
    }
    for forge, (variable, value) in secrets.items():
        if not value:
            log.warning(
                "%s is not set: every %s webhook is rejected with 401 until it is", variable, forge
            )


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then finish or hand back running attempts."""
    warn_about_webhook_secrets(settings)
    services = await build_services(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serving(create_app(services), settings.host, settings.port) as port:
            await services.start_background()
            log.info("kubeci serving on http://%s:%d", settings.host, port)
            await stop.wait()
            log.info("shutting down")
    finally:
        await close_services(services)
    return 0


async def migrate_only(settings: Settings) -> int:
    pool, embedded = await open_database(settings)
    await pool.close()
    if embedded is not None:
        await asyncio.to_thread(embedded.stop)
    log.info("database schema is up to date")
    return 0
