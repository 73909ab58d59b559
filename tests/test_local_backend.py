"""The local backend, backend choice and the action registry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bot.actions.base import AttemptContext
from bot.actions.kube_client import (
    KubernetesConfigError,
    choose_backend,
    find_cluster_source,
    load_configuration,
)
from bot.actions.kubernetes_deployment import KubernetesDeploymentAction
from bot.actions.kubernetes_job import KubernetesJobAction
from bot.actions.local_backend import LocalDeploymentAction, LocalJobAction
from bot.actions.registry import build_actions
from bot.config import ConfigError, Settings
from bot.net.secrets import SecretStore
from tests.fakes.kubernetes import AttemptRecorder, make_attempt

PY = sys.executable


def job(recorder: AttemptRecorder, arguments: dict[str, Any], **overrides: Any) -> AttemptContext:
    return make_attempt(arguments, recorder, **overrides)


def python_job(code: str, **extra: Any) -> dict[str, Any]:
    return {"image": "python:3.12", "command": [PY, "-c", code], **extra}


def alive(pid: int) -> bool:
    """Tell whether a process runs; a zombie (killed, not yet reaped) counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ends_soon(pid: int, timeout_s: float = 3.0) -> bool:
    """Tell whether the process has ended, or ends within `timeout_s` (a SIGKILL is not
    instant on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for_pid(path: Path, timeout_s: float = 5.0) -> int:
    """Wait (blocking: run it in a thread) until a process writes its pid to `path`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise TimeoutError(f"no pid in {path} after {timeout_s} s")


def data_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.endswith(".lock"))


SLEEPER = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
    "time.sleep(30)\n"
)


# --- Jobs ----------------------------------------------------------------------------


async def test_local_job_captures_output(tmp_path: Path) -> None:
    recorder = AttemptRecorder()
    code = "import sys; print('out 1'); print('err 1', file=sys.stderr); print('out 2')"
    action = LocalJobAction(Settings(data_dir=tmp_path))
    result = await action.execute(job(recorder, python_job(code)))

    assert result.outcome == "succeeded"
    assert recorder.text("local/stdout") == "out 1\nout 2\n"
    assert recorder.text("local/stderr") == "err 1\n"
    assert "The image python:3.12 is ignored" in recorder.text("kubeci")


async def test_local_job_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECI_SECRET_DEPLOY_KEY", "hunter2")
    recorder = AttemptRecorder()
    code = (
        "import os; print(os.environ['MODE'], os.environ['KUBECI_CALLBACK_URL'],"
        " os.environ['KUBECI_CALLBACK_TOKEN'], os.environ.get('KUBECI_SECRET_DEPLOY_KEY'))"
    )
    arguments = python_job(code, env={"MODE": "ci"})
    await LocalJobAction(Settings(data_dir=tmp_path)).execute(job(recorder, arguments))

    assert recorder.text("local/stdout") == (
        "ci http://127.0.0.1:8080/callbacks/tok-123 tok-123 None\n"
    )


async def test_local_job_command_line_masked(tmp_path: Path) -> None:
    # A quote in the secret makes shlex.quote split it, so masking must come first.
    recorder = AttemptRecorder()
    secret = "it's-a-secret"
    arguments = python_job("print(1)", args=[secret, f"--token={secret}"])
    mask = SecretStore({"X": secret}).mask
    await LocalJobAction(Settings(data_dir=tmp_path)).execute(job(recorder, arguments, mask=mask))

    line = recorder.text("kubeci")
    assert "s-a-secret" not in line
    assert "'--token=***'" in line


async def test_local_job_args_follow_command(tmp_path: Path) -> None:
    recorder = AttemptRecorder()
    arguments = python_job("import sys; print(sys.argv[1:])", args=["a", "b c"])
    await LocalJobAction(Settings(data_dir=tmp_path)).execute(job(recorder, arguments))
    assert recorder.text("local/stdout") == "['a', 'b c']\n"


async def test_local_job_nonzero_exit_fails(tmp_path: Path) -> None:
    recorder = AttemptRecorder()
    code = "import sys; print('boom', file=sys.stderr); sys.exit(3)"
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(recorder, python_job(code))
    )

    assert result.outcome == "failed"
    assert result.message == "command exited with code 3"
    assert result.response_excerpt == "boom\n"


async def test_local_job_timeout_kills_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    arguments = {"image": "x", "command": [PY, "-c", SLEEPER, str(pid_file)]}
    action = LocalJobAction(Settings(data_dir=tmp_path), kill_grace_s=1.0)
    result = await action.execute(job(AttemptRecorder(), arguments, remaining_s=1.0))

    assert result.outcome == "failed"
    assert "timed out after 1 s" in result.message
    assert ends_soon(int(pid_file.read_text()))


async def test_local_job_cancel_kills_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    arguments = {"image": "x", "command": [PY, "-c", SLEEPER, str(pid_file)]}
    action = LocalJobAction(Settings(data_dir=tmp_path), kill_grace_s=1.0)
    task = asyncio.create_task(action.execute(job(AttemptRecorder(), arguments)))
    child = await asyncio.to_thread(wait_for_pid, pid_file)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ends_soon(child)


async def test_local_job_background_child_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "print('left a child behind')\n"
    )
    arguments = {"image": "x", "command": [PY, "-c", code, str(pid_file)]}
    recorder = AttemptRecorder()
    action = LocalJobAction(Settings(data_dir=tmp_path), kill_grace_s=1.0)
    result = await action.execute(job(recorder, arguments))

    assert result.outcome == "succeeded"
    assert recorder.text("local/stdout") == "left a child behind\n"
    assert ends_soon(int(pid_file.read_text()))


async def test_local_job_manifest_first_container(tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.12",
                            "command": [PY, "-c"],
                            "args": ["import os; print(os.environ['STAGE'])"],
                            "env": [{"name": "STAGE", "value": "one"}],
                        },
                        {"name": "other", "image": "busybox", "command": ["false"]},
                    ]
                }
            }
        },
    }
    recorder = AttemptRecorder()
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(recorder, {"manifest": manifest})
    )

    assert result.outcome == "succeeded"
    assert recorder.text("local/stdout") == "one\n"


async def test_local_job_needs_command(tmp_path: Path) -> None:
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(AttemptRecorder(), {"image": "python:3.12"})
    )

    assert result.outcome == "failed"
    assert "the local backend needs a command" in result.message
    assert result.retryable is False


async def test_local_job_missing_program(tmp_path: Path) -> None:
    arguments = {"image": "x", "command": ["kubeci-no-such-program"]}
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(AttemptRecorder(), arguments)
    )

    assert result.outcome == "failed"
    assert "cannot start 'kubeci-no-such-program'" in result.message


async def test_local_job_output_cap(tmp_path: Path) -> None:
    recorder = AttemptRecorder()
    action = LocalJobAction(Settings(data_dir=tmp_path), log_cap_bytes=50)
    await action.execute(job(recorder, python_job("print('x' * 200)")))

    text = recorder.text("local/stdout")
    assert text.startswith("x" * 50)
    assert "[output cut: longer than 50 bytes]" in text


async def test_local_job_nul_output_replaced(tmp_path: Path) -> None:
    recorder = AttemptRecorder()
    code = "import sys; sys.stdout.write('a' + chr(0) + 'b' + chr(10)); print('after')"
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(recorder, python_job(code))
    )

    assert result.outcome == "succeeded"
    assert recorder.text("local/stdout") == "a\ufffdb\nafter\n"


async def test_local_job_long_line_split_whole(tmp_path: Path) -> None:
    # 200 KB without a line break, of two-byte characters that chunks may split.
    recorder = AttemptRecorder()
    code = "import sys; sys.stdout.write(chr(233) * 100000)"
    await LocalJobAction(Settings(data_dir=tmp_path)).execute(job(recorder, python_job(code)))

    assert recorder.text("local/stdout") == "\u00e9" * 100000
    assert len([entry for entry in recorder.logs if entry[1] == "local/stdout"]) > 1


async def test_local_job_log_failure_drains_output(tmp_path: Path) -> None:
    # Far more output than a pipe buffers: the command would block if nobody read it.
    recorder = AttemptRecorder()

    async def failing_append(source: str, text: str) -> None:
        if source.startswith("local/"):
            raise OSError("the database is gone")
        await recorder.append_log(source, text)

    code = "[print('line', i, 'x' * 60) for i in range(5000)]"
    context = job(recorder, python_job(code), append_log=failing_append, remaining_s=20.0)
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(context)

    assert result.outcome == "succeeded"
    assert recorder.text("local/stdout") == ""


async def test_local_job_nul_argument_fails(tmp_path: Path) -> None:
    arguments = python_job("print(1)", args=["a\x00b"])
    result = await LocalJobAction(Settings(data_dir=tmp_path)).execute(
        job(AttemptRecorder(), arguments)
    )

    assert result.outcome == "failed"
    assert result.retryable is False
    assert "null byte" in result.message
    assert "\x00" not in result.message


# --- Deployments ---------------------------------------------------------------------


def records(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())["deployments"])


async def test_local_deployment_records_update(tmp_path: Path) -> None:
    state = tmp_path / "state" / "deployments.json"
    action = LocalDeploymentAction(Settings(local_state_file=str(state)))
    arguments = {"namespace": "prod", "name": "web", "images": {"web": "w:1"}, "replicas": 3}
    result = await action.execute(make_attempt(arguments, AttemptRecorder()))

    record = records(state)["prod/web"]
    assert result.outcome == "succeeded"
    assert "no cluster was changed" in result.message
    assert record["images"] == {"web": "w:1"}
    assert record["replicas"] == 3
    assert record["revision"] == 1
    assert record["previous"] == {"images": {}, "replicas": None, "env": {}, "revision": 0}


async def test_local_deployment_keeps_previous(tmp_path: Path) -> None:
    action = LocalDeploymentAction(Settings(data_dir=tmp_path))
    first = {"name": "web", "images": {"web": "w:1"}, "env": {"A": "1", "B": "2"}}
    second = {"name": "web", "images": {"web": "w:2"}, "env": {"B": None}}
    await action.execute(make_attempt(first, AttemptRecorder()))
    await action.execute(make_attempt(second, AttemptRecorder()))

    record = records(tmp_path / "local-deployments.json")["default/web"]
    assert record["revision"] == 2
    assert record["images"] == {"web": "w:2"}
    assert record["env"] == {"A": "1"}
    assert record["previous"]["images"] == {"web": "w:1"}
    assert record["previous"]["env"] == {"A": "1", "B": "2"}
    assert data_files(tmp_path) == ["local-deployments.json"]


async def test_local_deployment_no_change(tmp_path: Path) -> None:
    action = LocalDeploymentAction(Settings(data_dir=tmp_path))
    arguments = {"name": "web", "replicas": 2}
    await action.execute(make_attempt(arguments, AttemptRecorder()))
    result = await action.execute(make_attempt(arguments, AttemptRecorder()))

    assert "nothing to change" in result.message
    assert records(tmp_path / "local-deployments.json")["default/web"]["revision"] == 1


async def test_local_deployment_rollback_flag_said(tmp_path: Path) -> None:
    action = LocalDeploymentAction(Settings(data_dir=tmp_path))
    arguments = {"name": "web", "replicas": 2, "rollback_on_failure": True}
    result = await action.execute(make_attempt(arguments, AttemptRecorder()))

    assert result.outcome == "succeeded"
    assert "rollback_on_failure never applies" in result.message


async def test_local_deployment_concurrent_updates(tmp_path: Path) -> None:
    action = LocalDeploymentAction(Settings(data_dir=tmp_path))
    attempts = [
        make_attempt({"name": f"svc-{index}", "replicas": index}, AttemptRecorder())
        for index in range(8)
    ]
    await asyncio.gather(*(action.execute(ctx) for ctx in attempts))
    assert len(records(tmp_path / "local-deployments.json")) == 8


async def test_local_deployment_corrupt_file(tmp_path: Path) -> None:
    state = tmp_path / "broken.json"
    state.write_text("{not json")
    action = LocalDeploymentAction(Settings(local_state_file=str(state)))
    result = await action.execute(make_attempt({"name": "web", "replicas": 1}, AttemptRecorder()))

    assert result.outcome == "failed"
    assert "is not valid JSON" in result.message
    assert "delete it" in result.message


async def test_local_deployment_reexecution_recorded_once(tmp_path: Path) -> None:
    action = LocalDeploymentAction(Settings(data_dir=tmp_path))
    arguments = {"name": "web", "replicas": 2}
    ctx = make_attempt(arguments, AttemptRecorder())
    await action.execute(ctx)
    again = make_attempt(arguments, AttemptRecorder(), data={"revision": 1}, recovered=True)
    result = await action.execute(again)

    assert "recorded as revision 1" in result.message


# --- Backend choice and registry -----------------------------------------------------


def test_backend_explicit_local(tmp_path: Path) -> None:
    settings = Settings(backend="local", kubeconfig=str(tmp_path / "absent"))
    assert choose_backend(settings) == "local"


def test_backend_invalid_value() -> None:
    with pytest.raises(ConfigError) as caught:
        choose_backend(Settings(backend="docker"))
    assert "KUBECI_BACKEND='docker'" in str(caught.value)


def test_backend_local_without_cluster(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    environ = {"HOME": str(tmp_path)}
    backend = choose_backend(Settings(), environ=environ, token_path=tmp_path / "token")
    assert backend == "local"
    assert "No cluster configuration found" in caplog.text


def test_backend_kubeconfig_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = tmp_path / "kubeconfig"
    config.write_text("apiVersion: v1\nkind: Config\n")
    environ = {"HOME": str(tmp_path), "KUBECONFIG": f"{config}{os.pathsep}/elsewhere"}
    backend = choose_backend(Settings(), environ=environ, token_path=tmp_path / "token")
    assert backend == "kubernetes"
    assert f"kubeconfig {config}" in caplog.text


def test_backend_in_cluster(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    environ = {"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    source = find_cluster_source(Settings(), environ=environ, token_path=token)
    assert source is not None
    assert source.kind == "in-cluster"


async def test_in_cluster_configuration_loads(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    configuration = await load_configuration(Settings(), environ=environ, token_path=token)

    assert configuration.host == "https://10.0.0.1:443"
    assert configuration.api_key["BearerToken"] == "Bearer sa-token"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")


async def test_no_configuration_error(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    with pytest.raises(KubernetesConfigError) as caught:
        await load_configuration(Settings(), environ=environ, token_path=tmp_path / "token")
    assert "set KUBECI_BACKEND=local" in str(caught.value)


def test_backend_explicit_kubeconfig_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_cluster_source(Settings(kubeconfig=str(tmp_path / "absent")))
    assert "KUBECI_KUBECONFIG=" in str(caught.value)


def test_registry_local_actions(tmp_path: Path) -> None:
    actions = build_actions(Settings(backend="local", data_dir=tmp_path))
    assert isinstance(actions["kubernetes_job"], LocalJobAction)
    assert isinstance(actions["kubernetes_deployment"], LocalDeploymentAction)


def test_registry_kubernetes_actions() -> None:
    actions = build_actions(Settings(backend="kubernetes"))
    assert isinstance(actions["kubernetes_job"], KubernetesJobAction)
    assert isinstance(actions["kubernetes_deployment"], KubernetesDeploymentAction)
    assert actions["kubernetes_job"].uses_callback is True
    assert actions["kubernetes_deployment"].uses_callback is False
