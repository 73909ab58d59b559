"""The kubernetes_deployment action against the fake Kubernetes API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.actions.base import AttemptContext, AttemptResult
from bot.actions.kubernetes_deployment import (
    DeploymentActionOptions,
    KubernetesDeploymentAction,
    label_selector,
    parse_deployment_arguments,
    rollout_status,
    strategic_patch,
    updated_template,
)
from bot.actions.kubernetes_job import ArgumentError
from bot.config import Settings
from tests.fakes.kubernetes import (
    AttemptRecorder,
    FakeKubernetes,
    make_attempt,
    strategic_merge_patch,
)

NS = "prod"
SETTINGS = Settings(kube_namespace=NS)
FAST = DeploymentActionOptions(watch_timeout_s=5, deadline_margin_s=0.1)
CONTAINERS = [
    {
        "name": "web",
        "image": "registry.test/web:1",
        "env": [
            {"name": "LOG_LEVEL", "value": "debug"},
            {"name": "DEBUG", "value": "1"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}},
        ],
    },
    {"name": "sidecar", "image": "registry.test/proxy:3"},
]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(namespaces=[NS]) as fake:
        fake.add_deployment(NS, "web", CONTAINERS, replicas=2)
        yield fake


def action(kube: FakeKubernetes) -> KubernetesDeploymentAction:
    return KubernetesDeploymentAction(SETTINGS, kube.api_client, FAST)


def start(kube: FakeKubernetes, ctx: AttemptContext) -> asyncio.Task[AttemptResult]:
    return asyncio.create_task(asyncio.wait_for(action(kube).execute(ctx), 10))


def attempt(arguments: dict[str, Any], **overrides: Any) -> AttemptContext:
    return make_attempt(
        {"name": "web", **arguments}, AttemptRecorder(), task_name="rollout", **overrides
    )


def web(kube: FakeKubernetes) -> dict[str, Any]:
    return kube.get("deployments", NS, "web")


def web_env(kube: FakeKubernetes) -> list[dict[str, Any]]:
    return list(web(kube)["spec"]["template"]["spec"]["containers"][0]["env"])


async def patched(kube: FakeKubernetes) -> None:
    await kube.wait_until(lambda: kube.requests_for("patch", "deployments"))


# --- Arguments and pure helpers ------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"images": {"web": "x:1"}}, "name is required"),
        ({"name": "web"}, "at least one of images, replicas or env"),
        ({"name": "web", "replicas": -1}, "replicas must be a whole number"),
        ({"name": "web", "replicas": True}, "replicas must be a whole number"),
        ({"name": "web", "images": {"web": ""}}, "images must map container names"),
        ({"name": "web", "env": {"BAD NAME": "x"}}, "env name 'BAD NAME' is invalid"),
        ({"name": "web", "rollback_on_failure": "yes"}, "rollback_on_failure must be true"),
        ({"name": "web", "replica": 2}, "unknown argument(s) replica"),
    ],
)
def test_deployment_bad_arguments(arguments: dict[str, Any], expected: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_deployment_arguments(arguments, SETTINGS)
    assert expected in str(caught.value)


def test_deployment_replicas_from_placeholder_string() -> None:
    args = parse_deployment_arguments({"name": "web", "replicas": "3"}, SETTINGS)
    assert args.replicas == 3
    assert args.namespace == NS


def test_updated_template_matches_fake_patch() -> None:
    args = parse_deployment_arguments(
        {"name": "web", "images": {"web": "w:2"}, "env": {"DEBUG": None, "TOKEN": "t", "NEW": 1}},
        SETTINGS,
    )
    deployment = {"spec": {"replicas": 2, "template": {"spec": {"containers": CONTAINERS}}}}
    result = strategic_merge_patch(deployment, strategic_patch(deployment, args))
    assert result["spec"]["template"] == updated_template(deployment["spec"]["template"], args)


def test_rollout_status_waits_for_generation() -> None:
    deployment = {
        "metadata": {"generation": 3},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 2, "updatedReplicas": 1, "replicas": 1},
    }
    status = rollout_status(deployment)
    assert status.done is False
    assert "generation 3" in status.progress


def test_rollout_status_old_replicas_pending() -> None:
    deployment = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 2,
            "replicas": 3,
            "updatedReplicas": 2,
            "readyReplicas": 3,
            "availableReplicas": 3,
        },
    }
    assert rollout_status(deployment).progress == "1 old replicas are pending termination"


def test_label_selector_expressions() -> None:
    selector = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "app=web,tier in (a,b),!canary"


# --- Updates and rollouts ------------------------------------------------------------


async def test_deployment_image_update_rolls_out(kube: FakeKubernetes) -> None:
    ctx = attempt({"images": {"web": "registry.test/web:2"}})
    task = start(kube, ctx)
    await patched(kube)
    kube.set_rollout(NS, "web", observedGeneration=2, updatedReplicas=1, replicas=3)
    await asyncio.sleep(0.05)
    assert not task.done()
    kube.complete_rollout(NS, "web")
    result = await task

    patch = kube.requests_for("patch", "deployments")[0]
    assert result.outcome == "succeeded"
    assert "2 replicas updated and available" in result.message
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.body == {
        "spec": {
            "template": {"spec": {"containers": [{"name": "web", "image": "registry.test/web:2"}]}}
        }
    }
    assert web(kube)["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/web:2"
    assert (
        web(kube)["spec"]["template"]["spec"]["containers"][1]["image"] == "registry.test/proxy:3"
    )


async def test_deployment_previous_saved_before_patch(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt({"name": "web", "replicas": 4}, recorder)
    kube.auto_rollout = True
    await asyncio.wait_for(action(kube).execute(ctx), 10)

    previous = recorder.saved[0]["previous"]
    assert previous["replicas"] == 2
    assert previous["template"]["spec"]["containers"][0]["image"] == "registry.test/web:1"


async def test_deployment_scale(kube: FakeKubernetes) -> None:
    kube.auto_rollout = True
    result = await asyncio.wait_for(action(kube).execute(attempt({"replicas": 5})), 10)

    assert result.outcome == "succeeded"
    assert web(kube)["spec"]["replicas"] == 5
    assert web(kube)["status"]["availableReplicas"] == 5


async def test_deployment_env_set_and_remove(kube: FakeKubernetes) -> None:
    kube.auto_rollout = True
    arguments = {"env": {"LOG_LEVEL": "info", "DEBUG": None, "TOKEN": "plain", "NEW": "yes"}}
    result = await asyncio.wait_for(action(kube).execute(attempt(arguments)), 10)

    sidecar = web(kube)["spec"]["template"]["spec"]["containers"][1]
    assert result.outcome == "succeeded"
    assert web_env(kube) == [
        {"name": "LOG_LEVEL", "value": "info"},
        {"name": "TOKEN", "value": "plain"},
        {"name": "NEW", "value": "yes"},
    ]
    assert {"name": "NEW", "value": "yes"} in sidecar["env"]


async def test_deployment_no_change_succeeds_at_once(kube: FakeKubernetes) -> None:
    arguments = {"images": {"web": "registry.test/web:1"}, "replicas": 2, "env": {"GONE": None}}
    result = await asyncio.wait_for(action(kube).execute(attempt(arguments)), 10)

    assert result.outcome == "succeeded"
    assert "nothing to change" in result.message
    assert kube.requests_for("patch", "deployments") == []
    assert kube.requests_for("watch", "deployments") == []


async def test_deployment_reexecution_does_not_patch_twice(kube: FakeKubernetes) -> None:
    kube.auto_rollout = True
    first = attempt({"images": {"web": "registry.test/web:2"}})
    await asyncio.wait_for(action(kube).execute(first), 10)
    again = attempt(
        {"images": {"web": "registry.test/web:2"}},
        data={"previous": first.data["previous"]},
        recovered=True,
    )
    result = await asyncio.wait_for(action(kube).execute(again), 10)

    assert result.outcome == "succeeded"
    assert len(kube.requests_for("patch", "deployments")) == 1
    assert len(kube.requests_for("list", "deployments")) == 2


async def test_deployment_progress_deadline_names_pods(kube: FakeKubernetes) -> None:
    ctx = attempt({"images": {"web": "registry.test/web:404"}})
    task = start(kube, ctx)
    await patched(kube)
    pod = kube.add_pod(NS, "web-7d9-x1", {"app": "web"}, ["web", "sidecar"])
    kube.set_waiting(NS, pod["metadata"]["name"], "web", "ImagePullBackOff", "not found")
    kube.fail_rollout(NS, "web", 'ReplicaSet "web-7d9" has timed out progressing.')
    result = await task

    assert result.outcome == "failed"
    assert "ProgressDeadlineExceeded" in result.message
    assert 'ReplicaSet "web-7d9" has timed out progressing.' in result.message
    assert "pod web-7d9-x1 container web ImagePullBackOff: not found" in result.message
    assert "sidecar" not in result.message


async def test_deployment_stale_progress_condition_ignored(kube: FakeKubernetes) -> None:
    kube.fail_rollout(NS, "web", "an earlier rollout timed out")
    task = start(kube, attempt({"images": {"web": "registry.test/web:2"}}))
    await patched(kube)
    await asyncio.sleep(0.05)
    assert not task.done()
    kube.complete_rollout(NS, "web")
    result = await task
    assert result.outcome == "succeeded"


async def test_deployment_own_deadline(kube: FakeKubernetes) -> None:
    ctx = attempt({"replicas": 3}, remaining_s=0.5)
    result = await asyncio.wait_for(action(kube).execute(ctx), 10)

    assert result.outcome == "failed"
    assert "did not finish within 0.45 s" in result.message
    assert "waiting for the controller to observe generation 2" in result.message


async def test_deployment_rollback_on_failure(kube: FakeKubernetes) -> None:
    arguments = {
        "images": {"web": "registry.test/web:bad"},
        "replicas": 4,
        "env": {"DEBUG": None},
        "rollback_on_failure": True,
    }
    task = start(kube, attempt(arguments))
    await patched(kube)
    kube.fail_rollout(NS, "web", "timed out")
    result = await task

    rollback = kube.requests_for("patch", "deployments")[1]
    container = web(kube)["spec"]["template"]["spec"]["containers"][0]
    assert result.outcome == "failed"
    assert "Rolled back to the previous pod template" in result.message
    assert rollback.content_type == "application/json-patch+json"
    assert container["image"] == "registry.test/web:1"
    assert container["env"] == CONTAINERS[0]["env"]
    assert web(kube)["spec"]["replicas"] == 2


async def test_deployment_rollback_after_own_deadline(kube: FakeKubernetes) -> None:
    arguments = {"images": {"web": "registry.test/web:slow"}, "rollback_on_failure": True}
    result = await asyncio.wait_for(action(kube).execute(attempt(arguments, remaining_s=0.3)), 10)

    assert result.outcome == "failed"
    assert "Rolled back" in result.message
    assert web(kube)["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/web:1"


async def test_deployment_watch_error_rolls_back(kube: FakeKubernetes) -> None:
    kube.inject_error("watch", "deployments", 403)
    arguments = {"images": {"web": "registry.test/web:2"}, "rollback_on_failure": True}
    result = await asyncio.wait_for(action(kube).execute(attempt(arguments)), 10)

    assert result.outcome == "failed"
    assert "Kubernetes denied watch on deployments.apps" in result.message
    assert "Rolled back" in result.message
    assert web(kube)["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/web:1"


async def test_deployment_unknown_container(kube: FakeKubernetes) -> None:
    result = await asyncio.wait_for(action(kube).execute(attempt({"images": {"api": "x:1"}})), 10)

    assert result.outcome == "failed"
    assert "has no container named api; its containers are web, sidecar" in result.message
    assert result.retryable is False


async def test_deployment_not_found(kube: FakeKubernetes) -> None:
    ctx = make_attempt({"name": "api", "replicas": 1}, AttemptRecorder())
    result = await asyncio.wait_for(action(kube).execute(ctx), 10)

    assert result.outcome == "failed"
    assert result.response_status == 404
    assert "deployments.apps 'api' not found in namespace 'prod'" in result.message


async def test_deployment_patch_forbidden(kube: FakeKubernetes) -> None:
    kube.inject_error("patch", "deployments", 403)
    result = await asyncio.wait_for(action(kube).execute(attempt({"replicas": 3})), 10)

    assert result.outcome == "failed"
    assert "Grant KubeCI's service account the verb 'patch' on resource 'deployments'" in (
        result.message
    )


async def test_deployment_invalid_patch_shows_message(kube: FakeKubernetes) -> None:
    kube.inject_error(
        "patch",
        "deployments",
        422,
        message='Deployment.apps "web" is invalid: spec.template.spec.containers[0].image: '
        "Required value",
    )
    result = await asyncio.wait_for(action(kube).execute(attempt({"replicas": 3})), 10)

    assert result.outcome == "failed"
    assert "spec.template.spec.containers[0].image: Required value" in result.message
    assert result.retryable is False


async def test_deployment_watch_410_lists_again(kube: FakeKubernetes) -> None:
    task = start(kube, attempt({"replicas": 3}))
    await kube.wait_until(lambda: kube.requests_for("watch", "deployments"))
    kube.expire_watches("deployments")
    await kube.wait_until(lambda: len(kube.requests_for("list", "deployments")) >= 2)
    kube.complete_rollout(NS, "web")
    result = await task
    assert result.outcome == "succeeded"
