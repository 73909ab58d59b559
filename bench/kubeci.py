"""`kubeci serve` as a child process on a free port of 127.0.0.1, the way it is deployed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Child, child, free_port, wait_http


@dataclass
class Served:
    process: Child
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def kubeci_serve(
    dsn: str, log_path: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[Served]:
    """Run `python -m bot serve` on `dsn` with the default settings plus `env`."""
    port = free_port()
    settings = {
        "DATABASE_URL": dsn,
        "KUBECI_HOST": "127.0.0.1",
        "KUBECI_PORT": str(port),
        "KUBECI_PUBLIC_URL": "",
        **(env or {}),
    }
    async with child(["-m", "bot", "serve"], log_path, settings) as process:
        served = Served(process, port)
        await wait_http(process, f"{served.base_url}/readyz")
        yield served
