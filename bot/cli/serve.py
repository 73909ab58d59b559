"""`kubeci serve` and `kubeci migrate`."""

from __future__ import annotations

import asyncio
import logging
import signal

from bot.app import build_services, close_services, create_app, open_database, serving
from bot.config import Settings
from bot.intake.service import configuration_warnings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then finish or hand back running attempts."""
    for warning in configuration_warnings(settings):
        log.warning("%s", warning)
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
