"""Runs of untrusted pull requests get nothing of the server's or the cluster's secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.actions.kubernetes_deployment import KubernetesDeploymentAction
from bot.actions.kubernetes_job import KubernetesJobAction, build_job, parse_job_arguments
from bot.actions.local_backend import LocalDeploymentAction, LocalJobAction
from bot.config import Settings
from tests.fakes.kubernetes import AttemptRecorder, FakeKubernetes, make_attempt

NS = "ci"

SECRET_MANIFEST: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {
        "template": {
            "spec": {
                "serviceAccountName": "kubeci",
                "volumes": [{"name": "creds", "secret": {"secretName": "kubeci-secrets"}}],
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "envFrom": [{"secretRef": {"name": "kubeci-secrets"}}],
                        "env": [
                            {
                                "name": "TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}},
                            }
                        ],
                    }
                ],
            }
        }
    },
}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    fake = FakeKubernetes(namespaces=(NS,))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def job_action(kube: FakeKubernetes) -> KubernetesJobAction:
    settings = Settings(kube_namespace=NS)
    return KubernetesJobAction(settings, kube.api_client)


async def test_untrusted_manifest_secrets_refused(kube: FakeKubernetes) -> None:
    ctx = make_attempt({"manifest": SECRET_MANIFEST}, AttemptRecorder(), trusted=False)
    result = await job_action(kube).execute(ctx)
    assert result.outcome == "failed"
    assert result.retryable is False
    for field in ("serviceAccountName", "volumes[0]", "envFrom", "env[TOKEN]"):
        assert field in result.message
    assert kube.requests_for("create", "jobs") == []


async def test_untrusted_inline_service_account_refused(kube: FakeKubernetes) -> None:
    arguments = {"image": "busybox", "command": ["true"], "service_account": "kubeci"}
    ctx = make_attempt(arguments, AttemptRecorder(), trusted=False)
    result = await job_action(kube).execute(ctx)
    assert result.outcome == "failed"
    assert "service_account" in result.message


async def test_untrusted_other_namespace_refused(kube: FakeKubernetes) -> None:
    arguments = {"image": "busybox", "command": ["true"], "namespace": "prod"}
    ctx = make_attempt(arguments, AttemptRecorder(), trusted=False)
    result = await job_action(kube).execute(ctx)
    assert result.outcome == "failed"
    assert "'prod'" in result.message


def test_untrusted_job_has_no_token() -> None:
    ctx = make_attempt({"image": "busybox"}, AttemptRecorder(), trusted=False)
    job = build_job(ctx, parse_job_arguments(ctx.arguments), "kubeci-x", NS, 3600)
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_trusted_job_keeps_token_default() -> None:
    ctx = make_attempt({"image": "busybox"}, AttemptRecorder())
    job = build_job(ctx, parse_job_arguments(ctx.arguments), "kubeci-x", NS, 3600)
    assert "automountServiceAccountToken" not in job["spec"]["template"]["spec"]


async def test_untrusted_local_job_refused(tmp_path: Path) -> None:
    action = LocalJobAction(Settings(data_dir=tmp_path))
    ctx = make_attempt({"image": "x", "command": ["true"]}, AttemptRecorder(), trusted=False)
    result = await action.execute(ctx)
    assert result.outcome == "failed"
    assert "KubeCI host" in result.message


async def test_untrusted_deployment_refused(tmp_path: Path, kube: FakeKubernetes) -> None:
    arguments = {"namespace": NS, "name": "web", "replicas": 2}
    for action in (
        LocalDeploymentAction(Settings(data_dir=tmp_path)),
        KubernetesDeploymentAction(Settings(kube_namespace=NS), kube.api_client),
    ):
        result = await action.execute(make_attempt(arguments, AttemptRecorder(), trusted=False))
        assert result.outcome == "failed"
        assert result.retryable is False
        assert "untrusted" in result.message
