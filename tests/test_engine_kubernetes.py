"""Kubernetes Jobs through the whole engine: re-attach after a killed worker, cancellation,
and the local backend."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bot.config import Settings
from tests.fakes.kubernetes import FakeKubernetes
from tests.harness import fast_settings, running_core

NS = "ci"
ROOT = Path(__file__).resolve().parent.parent

JOB_PIPELINE = """
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: unit
            action: kubernetes_job
            timeout_s: 60
            arguments:
              image: "python:3.12"
              command: [pytest, -q]
"""


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    fake = FakeKubernetes(namespaces=(NS,))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def kube_settings(database_dsn: str, kubeconfig: Path) -> Settings:
    return fast_settings(
        database_dsn,
        backend="kubernetes",
        kubeconfig=str(kubeconfig),
        kube_namespace=NS,
        lease_s=1.5,
    )


async def _single_job_name(kube: FakeKubernetes) -> str:
    await kube.wait_until(lambda: kube.requests_for("create", "jobs"), timeout_s=10)
    names = [name for (namespace, name) in kube.objects["jobs"] if namespace == NS]
    assert len(names) == 1
    return names[0]


@pytest.mark.slow
async def test_killed_worker_reattaches_to_job(
    db: asyncpg.Pool, database_dsn: str, kube: FakeKubernetes, tmp_path: Path
) -> None:
    settings = kube_settings(database_dsn, kube.write_kubeconfig(tmp_path / "kubeconfig"))
    async with running_core(db, settings, start_worker=False) as core:
        run_id = await core.start_run(JOB_PIPELINE, {"sha": "abc123"})
        env = {
            **os.environ,
            "KUBECI_BACKEND": "kubernetes",
            "KUBECI_KUBECONFIG": settings.kubeconfig,
            "KUBECI_KUBE_NAMESPACE": NS,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.worker_process", database_dsn, cwd=ROOT, env=env
        )
        try:
            job_name = await _single_job_name(kube)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        await core.services.start_background()
        await kube.wait_until(lambda: kube.requests_for("get", "jobs"), timeout_s=10)
        kube.run_job_pod(NS, job_name, {"main": "12 passed\n"})
        assert await core.wait_run(run_id, timeout_s=20) == "succeeded"
    assert len(kube.requests_for("create", "jobs")) == 1
    assert (NS, job_name) not in kube.objects["jobs"]
    logs = await db.fetchval("SELECT string_agg(content, '') FROM logs")
    assert "12 passed" in logs


async def test_cancelled_run_deletes_job(
    db: asyncpg.Pool, database_dsn: str, kube: FakeKubernetes, tmp_path: Path
) -> None:
    settings = kube_settings(database_dsn, kube.write_kubeconfig(tmp_path / "kubeconfig"))
    async with running_core(db, settings) as core:
        run_id = await core.start_run(JOB_PIPELINE, {"sha": "abc123"})
        job_name = await _single_job_name(kube)
        async with db.acquire() as conn, conn.transaction():
            await core.engine.cancel_run(conn, run_id, reason="superseded in a test")
        assert await core.wait_run(run_id) == "cancelled"
        await kube.wait_until(lambda: (NS, job_name) not in kube.objects["jobs"])
    assert kube.requests_for("delete", "jobs")


async def test_job_success_through_engine(
    db: asyncpg.Pool, database_dsn: str, kube: FakeKubernetes, tmp_path: Path
) -> None:
    settings = kube_settings(database_dsn, kube.write_kubeconfig(tmp_path / "kubeconfig"))
    async with running_core(db, settings) as core:
        run_id = await core.start_run(JOB_PIPELINE, {"sha": "abc123", "repository": "acme/web"})
        job_name = await _single_job_name(kube)
        job = kube.objects["jobs"][(NS, job_name)]
        env = {
            item["name"]: item.get("value")
            for item in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["KUBECI_CALLBACK_URL"].startswith(core.engine.settings.callback_base_url)
        assert env["KUBECI_CALLBACK_TOKEN"]
        kube.run_job_pod(NS, job_name, {"main": "all green\n"})
        assert await core.wait_run(run_id) == "succeeded"


LOCAL_PIPELINE = """
jobs:
  - name: build
    steps:
      - name: test
        tasks:
          - name: hello
            action: kubernetes_job
            timeout_s: 30
            arguments:
              image: "python:3.12"
              command: [python3, -c, "import os; print('hello from', os.environ['GREETING'])"]
              env: {GREETING: "${branch}"}
"""


async def test_local_backend_runs_job_and_stores_logs(
    db: asyncpg.Pool, database_dsn: str, tmp_path: Path
) -> None:
    settings = fast_settings(database_dsn, backend="local", data_dir=tmp_path)
    async with running_core(db, settings) as core:
        run_id = await core.start_run(LOCAL_PIPELINE, {"branch": "main"})
        assert await core.wait_run(run_id) == "succeeded"
        logs = await db.fetchval("SELECT string_agg(content, '') FROM logs")
    assert "hello from main" in logs
    assert "image" in logs
