"""Child processes of a benchmark: start, wait until they respond, read CPU and memory, stop.

Children run from the repository root, so `python -m bot` and `python -m bench...` import
this checkout's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class ChildFailed(RuntimeError):
    """A child process exited or did not respond in time; the message names its log."""


def free_port() -> int:
    """Return a port on 127.0.0.1 that was free a moment ago (the child binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in kB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def postgres_cpu_seconds() -> dict[int, float]:
    """CPU time of every process named `postgres` on this machine, by process id."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (entry / "comm").read_text().strip() == "postgres":
                found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU time all cores of this machine spent on any work so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS_PER_S


@dataclass
class CpuClock:
    """Wall time and CPU time of chosen processes, and of Postgres, over one window.

    A Postgres backend that exits inside the window takes its CPU time with it, so the
    Postgres figure is a lower bound.
    """

    pids: Mapping[str, int]
    started_wall_s: float = 0.0
    started_cpu_s: dict[str, float] | None = None
    started_postgres_s: dict[int, float] | None = None
    started_machine_s: float = 0.0

    def start(self) -> None:
        self.started_wall_s = time.perf_counter()
        self.started_cpu_s = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.started_postgres_s = postgres_cpu_seconds()
        self.started_machine_s = machine_busy_seconds()

    def cores_used(self) -> dict[str, float]:
        """Cores each process used on average since start(), e.g. {"server_cores": 0.97}."""
        assert self.started_cpu_s is not None and self.started_postgres_s is not None
        wall_s = time.perf_counter() - self.started_wall_s
        used = {
            name: cpu_seconds(pid) - self.started_cpu_s[name] for name, pid in self.pids.items()
        }
        used["postgres"] = sum(
            cpu_s - self.started_postgres_s.get(pid, 0.0)
            for pid, cpu_s in postgres_cpu_seconds().items()
        )
        # Everything on the machine, other sessions' work included.
        used["machine"] = machine_busy_seconds() - self.started_machine_s
        return {f"{name}_cores": round(cpu_s / wall_s, 3) for name, cpu_s in used.items()}


@dataclass
class Child:
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise ChildFailed(
                f"child exited with status {self.process.returncode}; see {self.log_path}"
            )


@contextlib.asynccontextmanager
async def child(
    args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[Child]:
    """Run `python ARGS` from the repository root, output to `log_path`; stop it on exit.

    KUBECI_* variables of this process are not passed on: children get only `env`'s.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("KUBECI_")}
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=REPO_ROOT,
            env={**inherited, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    running = Child(process, log_path)
    try:
        yield running
    finally:
        await stop(process)


async def stop(process: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        process.kill()
        await process.wait()


async def wait_http(running: Child, url: str, timeout_s: float = 30.0) -> None:
    """Wait until GET `url` returns 200, or raise ChildFailed."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            running.check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise ChildFailed(f"{url} did not respond within {timeout_s:g} s; see {running.log_path}")


@contextlib.asynccontextmanager
async def py_spy(pid: int, svg_path: Path | None) -> AsyncIterator[None]:
    """Record a py-spy flame graph of process `pid` to `svg_path` (None: do nothing).

    A path ending in `.txt` gets collapsed stacks (`--format raw`), one line per stack.
    """
    if svg_path is None:
        yield
        return
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise ChildFailed("py-spy is not installed; install it with: pip install -e '.[bench]'")
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        found,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "100",
        "--format",
        "raw" if svg_path.suffix == ".txt" else "flamegraph",
        "--output",
        str(svg_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        # py-spy writes the flame graph when interrupted.
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
