"""The kubernetes_job action against the fake Kubernetes API, through kubernetes_asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.actions.base import AttemptContext, AttemptResult
from bot.actions.kube_client import KubeApi, api_client_factory
from bot.actions.kubernetes_job import (
    JobActionOptions,
    KubernetesJobAction,
    build_job,
    job_name_for,
    parse_job_arguments,
)
from bot.config import Settings
from tests.fakes.kubernetes import AttemptRecorder, FakeKubernetes, make_attempt

NS = "ci"
SETTINGS = Settings(kube_namespace=NS, stuck_pod_grace_s=0.3)
FAST = JobActionOptions(log_stream_grace_s=1.0, log_collect_timeout_s=2.0, watch_timeout_s=5)
INLINE = {"image": "python:3.12", "command": ["pytest", "-q"]}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubernetes]:
    async with FakeKubernetes(namespaces=[NS]) as fake:
        yield fake


def job_action(kube: FakeKubernetes, options: JobActionOptions = FAST) -> KubernetesJobAction:
    return KubernetesJobAction(SETTINGS, kube.api_client, options)


def start(action: KubernetesJobAction, ctx: AttemptContext) -> asyncio.Task[AttemptResult]:
    return asyncio.create_task(asyncio.wait_for(action.execute(ctx), 10))


async def first_pod(kube: FakeKubernetes, ctx: AttemptContext) -> str:
    pods = await kube.wait_until(lambda: kube.job_pods(NS, job_name_for(ctx)))
    return str(pods[0])


async def precreate_job(kube: FakeKubernetes, ctx: AttemptContext, **labels: str) -> None:
    """Create the attempt's Job the way an earlier, crashed process would have."""
    body = build_job(ctx, parse_job_arguments(ctx.arguments), job_name_for(ctx), NS, 3600)
    body["metadata"]["labels"].update(labels)
    async with KubeApi(await kube.api_client()) as api:
        await api.create_job(NS, body)


def created_body(kube: FakeKubernetes) -> dict[str, Any]:
    return dict(kube.requests_for("create", "jobs")[-1].body)


# --- Names and manifests -------------------------------------------------------------


def test_job_name_is_dns_label() -> None:
    ctx = make_attempt(INLINE, AttemptRecorder(), task_name="Integration Tests / " + "x" * 80)
    name = job_name_for(ctx)
    assert len(name) <= 63
    assert name.startswith("kubeci-integration-tests-x")
    assert name.replace("-", "").isalnum()


def test_job_name_differs_by_run_and_attempt() -> None:
    recorder = AttemptRecorder()
    first = job_name_for(make_attempt(INLINE, recorder))
    assert first == job_name_for(make_attempt(INLINE, recorder))
    assert first != job_name_for(make_attempt(INLINE, recorder, run_id=8))
    assert first != job_name_for(make_attempt(INLINE, recorder, attempt_number=2))


def test_build_job_inline_fields() -> None:
    ctx = make_attempt(
        {
            **INLINE,
            "args": ["tests/"],
            "env": {"MODE": "ci", "DEBUG": True},
            "resources": {"limits": {"cpu": "1"}},
            "service_account": "runner",
            "image_pull_secrets": ["registry"],
        },
        AttemptRecorder(),
        timeout_s=90.5,
    )
    job = build_job(ctx, parse_job_arguments(ctx.arguments), "kubeci-x-1", NS, 3600)

    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 91
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert container["command"] == ["pytest", "-q"]
    assert container["args"] == ["tests/"]
    assert container["resources"] == {"limits": {"cpu": "1"}}
    assert env == {
        "MODE": "ci",
        "DEBUG": "true",
        "KUBECI_CALLBACK_URL": "http://127.0.0.1:8080/callbacks/tok-123",
        "KUBECI_CALLBACK_TOKEN": "tok-123",
    }
    assert pod_spec["serviceAccountName"] == "runner"
    assert pod_spec["imagePullSecrets"] == [{"name": "registry"}]
    assert pod_spec["restartPolicy"] == "Never"


def test_build_job_labels_and_annotations() -> None:
    ctx = make_attempt(
        INLINE,
        AttemptRecorder(),
        labels={"repository": "Acme Corp/web.app", "sha": "b" * 40, "ref": "refs/pull/4/head"},
        extra={"run_url": "https://ci.example.test/runs/7"},
    )
    job = build_job(ctx, parse_job_arguments(INLINE), "kubeci-x-1", NS, 3600)
    labels = job["metadata"]["labels"]
    annotations = job["metadata"]["annotations"]
    assert labels["kubeci.dev/run-id"] == "7"
    assert labels["kubeci.dev/task-id"] == "21"
    assert labels["kubeci.dev/attempt"] == "1"
    assert labels["kubeci.dev/repository"] == "Acme-Corp-web.app"
    assert labels["kubeci.dev/sha"] == "b" * 40
    assert job["spec"]["template"]["metadata"]["labels"]["kubeci.dev/run-id"] == "7"
    assert annotations["kubeci.dev/ref"] == "refs/pull/4/head"
    assert annotations["kubeci.dev/repository"] == "Acme Corp/web.app"
    assert annotations["kubeci.dev/run-url"] == "https://ci.example.test/runs/7"


def test_build_job_merges_manifest() -> None:
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "mine-", "labels": {"team": "qa"}},
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 7200,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {"name": "a", "image": "busybox", "env": [{"name": "MODE", "value": "x"}]},
                        {"name": "b", "image": "busybox"},
                    ],
                }
            },
        },
    }
    ctx = make_attempt({"manifest": manifest, "env": {"MODE": "y"}}, AttemptRecorder())
    job = build_job(ctx, parse_job_arguments(ctx.arguments), "kubeci-x-1", NS, 3600)

    containers = job["spec"]["template"]["spec"]["containers"]
    first_env = {item["name"]: item["value"] for item in containers[0]["env"]}
    assert job["metadata"]["name"] == "kubeci-x-1"
    assert "generateName" not in job["metadata"]
    assert job["metadata"]["labels"]["team"] == "qa"
    assert job["metadata"]["labels"]["kubeci.dev/run-id"] == "7"
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 60
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert first_env["MODE"] == "y"
    assert first_env["KUBECI_CALLBACK_TOKEN"] == "tok-123"
    assert "KUBECI_CALLBACK_URL" in {item["name"] for item in containers[1]["env"]}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "image is required"),
        ({"image": "x", "command": "pytest -q"}, "command must be a list"),
        ({"image": "x", "env": {"1BAD": "v"}}, "env name '1BAD' is invalid"),
        ({"image": "x", "env": {"A": None}}, "env.A must be a string"),
        ({"image": "x", "colour": "red"}, "unknown argument(s) colour"),
        ({"manifest": {"kind": "Pod", "apiVersion": "v1"}}, "apiVersion batch/v1 and kind Job"),
        ({"manifest": {"apiVersion": "batch/v1", "kind": "Job"}, "image": "x"}, "either manifest"),
        ({"image": "x", "resources": {"cpu": 1}}, "resources must be a map"),
    ],
)
async def test_job_bad_arguments_fail(arguments: dict[str, Any], expected: str) -> None:
    action = KubernetesJobAction(SETTINGS, api_client_factory(SETTINGS))
    result = await action.execute(make_attempt(arguments, AttemptRecorder()))
    assert result.outcome == "failed"
    assert expected in result.message
    assert result.retryable is False


# --- Running Jobs --------------------------------------------------------------------


async def test_job_success_streams_logs_then_deletes(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_running(NS, pod, "main")
    kube.write_log(NS, pod, "main", "collected 3 items\n")
    await kube.wait_until(lambda: "collected 3 items" in recorder.text())
    kube.write_log(NS, pod, "main", "3 passed\nno newline at the end")
    kube.set_terminated(NS, pod, "main", 0)
    result = await task

    assert result.outcome == "succeeded"
    assert "completed" in result.message
    assert recorder.text(f"{pod}/main") == "collected 3 items\n3 passed\nno newline at the end"
    assert (NS, job_name_for(ctx)) not in kube.objects["jobs"]
    assert kube.job_pods(NS, job_name_for(ctx)) == []
    delete = kube.requests_for("delete", "jobs")
    assert [request.query.get("propagationPolicy") for request in delete] == ["Background"]


async def test_job_logs_stored_before_delete(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    await first_pod(kube, ctx)
    kube.run_job_pod(NS, job_name_for(ctx), {"main": "line one\nline two\n"})
    await task

    delete_seq = kube.requests_for("delete", "jobs")[0].seq
    full_reads = [r for r in kube.requests_for("get", "pods/log") if "follow" not in r.query]
    assert full_reads
    assert all(request.seq < delete_seq for request in full_reads)
    assert all(seq < delete_seq for seq, _, _ in recorder.logs)
    assert "line one\nline two\n" in recorder.text()
    assert recorder.saved[-1]["outcome"]["succeeded"] is True


async def test_job_init_container_logs(kube: FakeKubernetes) -> None:
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [{"name": "fetch", "image": "busybox"}],
                    "containers": [{"name": "test", "image": "busybox"}],
                }
            }
        },
    }
    recorder = AttemptRecorder()
    ctx = make_attempt({"manifest": manifest}, recorder)
    task = start(job_action(kube), ctx)
    await first_pod(kube, ctx)
    pod = kube.run_job_pod(NS, job_name_for(ctx), {"fetch": "fetched\n", "test": "tested\n"})
    result = await task

    assert result.outcome == "succeeded"
    assert recorder.text(f"{pod}/fetch") == "fetched\n"
    assert recorder.text(f"{pod}/test") == "tested\n"


async def test_job_log_cut_at_cap(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    options = JobActionOptions(log_cap_bytes=100, log_stream_grace_s=1.0, watch_timeout_s=5)
    task = start(job_action(kube, options), ctx)
    await first_pod(kube, ctx)
    pod = kube.run_job_pod(NS, job_name_for(ctx), {"main": "0123456789\n" * 50})
    await task

    text = recorder.text(f"{pod}/main")
    assert text.startswith("0123456789\n" * 9)
    assert "[log cut: longer than 100 bytes]" in text
    assert len(text.encode()) < 150


async def test_job_failure_names_exit_code(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    await first_pod(kube, ctx)
    kube.run_job_pod(NS, job_name_for(ctx), {"main": "FAILED test_x - assert 1 == 2\n"}, 3)
    result = await task

    assert result.outcome == "failed"
    assert "BackoffLimitExceeded" in result.message
    assert "container main in pod" in result.message
    assert "exited with code 3 (Error)" in result.message
    assert result.response_excerpt == "FAILED test_x - assert 1 == 2\n"
    assert kube.requests_for("delete", "jobs")


async def test_job_deadline_exceeded(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_running(NS, pod, "main")
    kube.write_log(NS, pod, "main", "still going\n")
    await kube.wait_until(lambda: "still going" in recorder.text())
    message = "Job was active longer than specified deadline"
    kube.fail_job(NS, job_name_for(ctx), "DeadlineExceeded", message)
    result = await task

    assert result.outcome == "failed"
    assert "DeadlineExceeded: Job was active longer than specified deadline" in result.message
    assert "still going\n" in recorder.text(f"{pod}/main")


async def test_job_stuck_image_pull_fails_early(kube: FakeKubernetes) -> None:
    ctx = make_attempt({"image": "registry.test/missing:1"}, AttemptRecorder())
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_waiting(NS, pod, "main", "ErrImagePull", 'pull access denied for "missing"')
    result = await task

    assert result.outcome == "failed"
    assert "failed early" in result.message
    assert "waiting with ErrImagePull" in result.message
    assert 'pull access denied for "missing"' in result.message
    assert kube.requests_for("delete", "jobs")


async def test_job_invalid_image_not_retryable(kube: FakeKubernetes) -> None:
    ctx = make_attempt({"image": "Bad Image"}, AttemptRecorder())
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_waiting(NS, pod, "main", "InvalidImageName", "invalid reference format")
    result = await task

    assert result.outcome == "failed"
    assert result.retryable is False


async def test_job_unschedulable_fails_early(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder())
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_unschedulable(NS, pod, "0/3 nodes are available: 3 Insufficient memory.")
    result = await task

    assert result.outcome == "failed"
    assert "unschedulable" in result.message
    assert "3 Insufficient memory" in result.message


async def test_job_short_image_pull_backoff_recovers(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder())
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_waiting(NS, pod, "main", "ImagePullBackOff", "Back-off pulling image")
    kube.set_running(NS, pod, "main")
    await asyncio.sleep(SETTINGS.stuck_pod_grace_s * 2)
    assert not task.done()
    kube.set_terminated(NS, pod, "main", 0)
    result = await task
    assert result.outcome == "succeeded"


async def test_job_cancel_collects_logs_and_deletes(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    kube.set_running(NS, pod, "main")
    kube.write_log(NS, pod, "main", "working\n")
    await kube.wait_until(lambda: "working" in recorder.text())
    kube.write_log(NS, pod, "main", "half a line")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert recorder.text(f"{pod}/main") == "working\nhalf a line"
    assert (NS, job_name_for(ctx)) not in kube.objects["jobs"]
    delete_seq = kube.requests_for("delete", "jobs")[0].seq
    assert all(seq < delete_seq for seq, _, _ in recorder.logs)


async def test_job_cancel_method_deletes_job(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder())
    await precreate_job(kube, ctx)
    ctx.data.update(job_name=job_name_for(ctx), namespace=NS)
    await job_action(kube).cancel(ctx)
    assert (NS, job_name_for(ctx)) not in kube.objects["jobs"]
    await job_action(kube).cancel(ctx)  # a Job already gone is fine


# --- Re-attaching --------------------------------------------------------------------


async def test_job_recovered_reattaches(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder, recovered=True)
    await precreate_job(kube, ctx)
    ctx.data.update(job_name=job_name_for(ctx), namespace=NS)
    creates_before = len(kube.requests_for("create", "jobs"))
    task = start(job_action(kube), ctx)
    await kube.wait_until(lambda: "Re-attached" in recorder.text())
    kube.run_job_pod(NS, job_name_for(ctx), {"main": "done\n"})
    result = await task

    assert result.outcome == "succeeded"
    assert len(kube.requests_for("create", "jobs")) == creates_before
    assert "done\n" in recorder.text()


async def test_job_conflict_on_create_reattaches(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    await precreate_job(kube, ctx)
    task = start(job_action(kube), ctx)
    await kube.wait_until(lambda: "Re-attached" in recorder.text())
    kube.run_job_pod(NS, job_name_for(ctx))
    result = await task

    assert result.outcome == "succeeded"
    assert len(kube.requests_for("create", "jobs")) == 2
    assert recorder.saved[0] == {"job_name": job_name_for(ctx), "namespace": NS}


async def test_job_conflict_with_foreign_job_fails(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder())
    await precreate_job(kube, ctx, **{"kubeci.dev/run-id": "999"})
    result = await asyncio.wait_for(job_action(kube).execute(ctx), 10)

    assert result.outcome == "failed"
    assert "was not created for this attempt" in result.message
    assert result.retryable is False


async def test_job_recovered_job_gone_creates_again(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder(), recovered=True)
    ctx.data.update(job_name=job_name_for(ctx), namespace=NS)
    task = start(job_action(kube), ctx)
    await first_pod(kube, ctx)
    kube.run_job_pod(NS, job_name_for(ctx))
    result = await task

    assert result.outcome == "succeeded"
    assert len(kube.requests_for("create", "jobs")) == 1


async def test_job_stored_outcome_returned(kube: FakeKubernetes) -> None:
    ctx = make_attempt(INLINE, AttemptRecorder(), recovered=True)
    await precreate_job(kube, ctx)
    ctx.data.update(
        job_name=job_name_for(ctx),
        namespace=NS,
        outcome={"succeeded": False, "message": "Job x failed: BackoffLimitExceeded"},
    )
    result = await asyncio.wait_for(job_action(kube).execute(ctx), 10)

    assert result.outcome == "failed"
    assert result.message == "Job x failed: BackoffLimitExceeded"
    assert (NS, job_name_for(ctx)) not in kube.objects["jobs"]
    assert not kube.requests_for("watch", "jobs")


# --- API errors ----------------------------------------------------------------------


async def test_job_forbidden_names_verb_and_resource(kube: FakeKubernetes) -> None:
    kube.inject_error("create", "jobs", 403)
    result = await job_action(kube).execute(make_attempt(INLINE, AttemptRecorder()))

    assert result.outcome == "failed"
    assert result.response_status == 403
    assert "Kubernetes denied create on jobs.batch in namespace 'ci'" in result.message
    assert "Grant KubeCI's service account the verb 'create' on resource 'jobs'" in result.message
    assert "system:serviceaccount:kubeci:kubeci cannot create" in result.message.replace('"', "")
    assert result.retryable is False


async def test_job_missing_namespace(kube: FakeKubernetes) -> None:
    arguments = {**INLINE, "namespace": "nope"}
    result = await job_action(kube).execute(make_attempt(arguments, AttemptRecorder()))

    assert result.outcome == "failed"
    assert result.response_status == 404
    assert "namespace 'nope' not found" in result.message
    assert result.retryable is False


async def test_job_invalid_shows_api_message(kube: FakeKubernetes) -> None:
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {"template": {"spec": {"containers": [{"name": "main"}]}}},
    }
    result = await job_action(kube).execute(make_attempt({"manifest": manifest}, AttemptRecorder()))

    assert result.outcome == "failed"
    assert result.response_status == 422
    assert "spec.template.spec.containers[0].image: Required value" in result.message
    assert result.retryable is False


async def test_job_watch_forbidden_deletes_job(kube: FakeKubernetes) -> None:
    kube.inject_error("watch", "pods", 403)
    ctx = make_attempt(INLINE, AttemptRecorder())
    result = await asyncio.wait_for(job_action(kube).execute(ctx), 10)

    assert result.outcome == "failed"
    assert "Kubernetes denied watch on pods" in result.message
    assert (NS, job_name_for(ctx)) not in kube.objects["jobs"]


async def test_job_watch_410_lists_again(kube: FakeKubernetes) -> None:
    recorder = AttemptRecorder()
    ctx = make_attempt(INLINE, recorder)
    task = start(job_action(kube), ctx)
    pod = await first_pod(kube, ctx)
    await kube.wait_until(lambda: kube.requests_for("watch", "pods"))
    kube.expire_watches("pods")
    await kube.wait_until(lambda: len(kube.requests_for("list", "pods")) >= 2)
    kube.send_bookmarks()
    kube.run_job_pod(NS, job_name_for(ctx), {"main": "after the relist\n"})
    result = await task

    assert result.outcome == "succeeded"
    assert "after the relist\n" in recorder.text(f"{pod}/main")


async def test_job_watch_resumes_after_timeout(kube: FakeKubernetes) -> None:
    options = JobActionOptions(log_stream_grace_s=1.0, watch_timeout_s=1)
    ctx = make_attempt(INLINE, AttemptRecorder())
    task = start(job_action(kube, options), ctx)
    await first_pod(kube, ctx)
    await kube.wait_until(lambda: len(kube.requests_for("watch", "jobs")) >= 2, timeout_s=5)
    kube.run_job_pod(NS, job_name_for(ctx))
    result = await task

    resumed = kube.requests_for("watch", "jobs")[1]
    assert result.outcome == "succeeded"
    assert resumed.query["resourceVersion"] != ""
    assert len(kube.requests_for("list", "jobs")) == 1


# --- Cluster configuration -----------------------------------------------------------


async def test_job_through_kubeconfig(kube: FakeKubernetes, tmp_path: Path) -> None:
    path = kube.write_kubeconfig(tmp_path / "config", token="secret-token")
    settings = Settings(kube_namespace=NS, kubeconfig=str(path))
    action = KubernetesJobAction(settings, api_client_factory(settings), FAST)
    ctx = make_attempt(INLINE, AttemptRecorder())
    task = start(action, ctx)
    await first_pod(kube, ctx)
    kube.run_job_pod(NS, job_name_for(ctx))
    result = await task

    assert result.outcome == "succeeded"
    assert kube.requests[0].authorization == "Bearer secret-token"


async def test_job_without_cluster_config(tmp_path: Path) -> None:
    settings = Settings(kube_namespace=NS, kubeconfig=str(tmp_path / "absent"))
    action = KubernetesJobAction(settings, api_client_factory(settings), FAST)
    result = await action.execute(make_attempt(INLINE, AttemptRecorder()))

    assert result.outcome == "failed"
    assert "KUBECI_KUBECONFIG" in result.message
    assert result.retryable is False
