"""The deploy/ manifests: they render, and the Role grants exactly what the code calls."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.actions.kube_client import REQUIRED_PERMISSIONS, Call, require_permission
from bot.actions.kubernetes_deployment import DeploymentActionOptions, KubernetesDeploymentAction
from bot.actions.kubernetes_job import JobActionOptions, KubernetesJobAction, job_name_for
from bot.config import Settings
from tests.fakes.kubernetes import AttemptRecorder, FakeKubernetes, make_attempt

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
Permission = tuple[str, str, str]


def load_documents(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name, encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def kustomize_documents() -> list[dict[str, Any]]:
    """Parse every file that kustomization.yaml lists, as kustomize would read them."""
    kustomization = load_documents("kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load_documents(name)]


def role_permissions() -> set[Permission]:
    roles = [doc for doc in kustomize_documents() if doc["kind"] == "Role"]
    assert len(roles) == 1
    return {
        (group, resource, verb)
        for rule in roles[0]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def declared_permissions() -> set[Permission]:
    return {
        (group, resource, verb)
        for (group, resource), verbs in REQUIRED_PERMISSIONS.items()
        for verb in verbs
    }


def find(kind: str) -> dict[str, Any]:
    return next(doc for doc in kustomize_documents() if doc["kind"] == kind)


# --- Manifests -----------------------------------------------------------------------


def test_kustomization_resources_parse() -> None:
    kinds = sorted(doc["kind"] for doc in kustomize_documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "Role",
        "RoleBinding",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    documents = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    namespaced = [doc for doc in documents if doc["kind"] != "Namespace"]
    assert all(doc["metadata"]["namespace"] == "kubeci" for doc in namespaced)
    images = [
        container["image"]
        for doc in documents
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    ]
    assert images == ["registry.example.com/kubeci:0.1.0"]


def test_role_binding_targets_service_account() -> None:
    binding = find("RoleBinding")
    deployment = find("Deployment")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": find("Role")["metadata"]["name"],
    }
    assert binding["subjects"][0]["name"] == find("ServiceAccount")["metadata"]["name"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kubeci"


def test_deployment_runs_as_non_root() -> None:
    spec = find("Deployment")["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"configMapRef": {"name": "kubeci-config"}} in container["envFrom"]
    assert {"secretRef": {"name": "kubeci-secrets"}} in container["envFrom"]


def test_postgres_marked_reference_only() -> None:
    statefulset = find("StatefulSet")
    assert statefulset["metadata"]["labels"]["kubeci.dev/reference-only"] == "true"


# --- RBAC ----------------------------------------------------------------------------


def test_role_matches_required_permissions() -> None:
    role = role_permissions()
    declared = declared_permissions()
    assert declared - role == set(), "verbs the code uses but deploy/role.yaml lacks"
    assert role - declared == set(), "verbs deploy/role.yaml grants but the code never uses"


def test_undeclared_call_rejected() -> None:
    with pytest.raises(RuntimeError) as caught:
        require_permission(Call("update", "apps", "deployments", "prod", "web"))
    assert "add it there and to deploy/role.yaml" in str(caught.value)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(namespaces=["ci"]) as fake:
        yield fake


async def test_actions_stay_within_role(kube: FakeKubernetes) -> None:
    """Run a Job and a failing rollout; every request must be one the Role grants."""
    settings = Settings(kube_namespace="ci", stuck_pod_grace_s=5)
    job = KubernetesJobAction(settings, kube.api_client, JobActionOptions(log_stream_grace_s=1))
    # A recovered attempt whose Job is gone: it reads the Job (get), then creates it.
    ctx = make_attempt({"image": "busybox"}, AttemptRecorder(), recovered=True)
    task = asyncio.create_task(job.execute(ctx))
    await kube.wait_until(lambda: kube.requests_for("watch", "jobs"))
    await kube.wait_until(lambda: kube.requests_for("watch", "pods"))
    kube.run_job_pod("ci", job_name_for(ctx), {"main": "ok\n"})
    assert (await asyncio.wait_for(task, 10)).outcome == "succeeded"

    kube.add_deployment("ci", "web", [{"name": "web", "image": "web:1"}])
    kube.add_pod("ci", "web-1", {"app": "web"}, ["web"])
    deployment = KubernetesDeploymentAction(
        settings, kube.api_client, DeploymentActionOptions(deadline_margin_s=0.1)
    )
    arguments = {"name": "web", "images": {"web": "web:2"}, "rollback_on_failure": True}
    result = await deployment.execute(make_attempt(arguments, AttemptRecorder(), remaining_s=0.5))
    assert result.outcome == "failed"

    used = {(request.group, request.resource, request.verb) for request in kube.requests}
    assert used - role_permissions() == set()
    assert used == declared_permissions()
