"""`kubeci run` as a user runs it: a subprocess with a pipeline file, against the test
database and a fake webhook target."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.fakes.target import FakeTarget, Reply

ROOT = Path(__file__).resolve().parent.parent

PIPELINE = """
jobs:
  - name: build
    steps:
      - name: checks
        tasks:
          - name: lint
            action: webhook
            arguments: {url: "${labels.target}/lint"}
          - name: unit
            action: webhook
            retries: 1
            backoff: {initial_s: 0.1, factor: 1, max_s: 0.1}
            arguments: {url: "${labels.target}/unit"}
"""


async def kubeci(
    database_dsn: str,
    *args: str,
    interrupt_after_s: float | None = None,
    env_extra: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_dsn,
        "KUBECI_BACKEND": "local",
        **(env_extra or {}),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if interrupt_after_s is not None:
        await asyncio.sleep(interrupt_after_s)
        process.send_signal(signal.SIGINT)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Path:
    path = tmp_path / ".kubeci.yml"
    path.write_text(PIPELINE)
    return path


async def test_run_succeeds_with_progress(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget, pipeline_file: Path
) -> None:
    fake_target.script("/unit", Reply(status=503), Reply())
    code, out, err = await kubeci(
        database_dsn, "run", str(pipeline_file), "--label", f"target={fake_target.base_url}"
    )
    assert code == 0, err
    assert "task unit attempt 1 failed" in out
    assert "task lint succeeded" in out
    assert "Summary of run" in out
    assert "task unit: succeeded, 2 attempt(s)" in out


async def test_run_failure_exits_one(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget, pipeline_file: Path
) -> None:
    fake_target.script("/lint", Reply(status=400))
    code, out, _ = await kubeci(
        database_dsn, "run", str(pipeline_file), "--label", f"target={fake_target.base_url}"
    )
    assert code == 1
    assert "job build failed" in out


async def test_run_invalid_file_lists_problems(
    db: asyncpg.Pool, database_dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("jobs:\n  - name: Bad_Name\n    steps: []\n")
    code, _, err = await kubeci(database_dsn, "run", str(path))
    assert code == 1
    assert f"{path}:2:" in err
    assert "Problem(" not in err


async def test_run_bad_label_exits_two(
    db: asyncpg.Pool, database_dsn: str, pipeline_file: Path
) -> None:
    code, _, err = await kubeci(database_dsn, "run", str(pipeline_file), "--label", "novalue")
    assert code == 2
    assert "KEY=VALUE" in err


async def test_run_interrupt_cancels_run(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget, pipeline_file: Path
) -> None:
    fake_target.script("/lint", Reply(delay_s=30))
    code, out, _ = await kubeci(
        database_dsn,
        "run",
        str(pipeline_file),
        "--label",
        f"target={fake_target.base_url}",
        interrupt_after_s=3.0,
    )
    assert code == 130
    assert "cancelling run" in out
    assert await db.fetchval("SELECT state FROM runs") == "cancelled"


async def test_bad_setting_is_one_line(
    db: asyncpg.Pool, database_dsn: str, pipeline_file: Path
) -> None:
    code, _, err = await kubeci(
        database_dsn, "run", str(pipeline_file), env_extra={"KUBECI_WORKER_CONCURRENCY": "0"}
    )
    assert code == 2
    assert err.strip() == (
        "kubeci: KUBECI_WORKER_CONCURRENCY=0 is invalid; set it to a whole number >= 1"
    )
