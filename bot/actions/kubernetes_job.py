"""The kubernetes_job action: run a task as a batch/v1 Job and follow it to its end.

One attempt is one Job, named from the run, task and attempt number, so an attempt
recovered by another process finds its Job again instead of creating a second one.
The action watches the Job and its pods and streams every container's log into the
attempt log. It fails early when a pod is stuck (image pull errors, unschedulable, bad
configuration). Once the Job ends it reads each log in full, and only then deletes the
Job.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from bot.actions.base import AttemptContext, AttemptResult
from bot.actions.kube_client import (
    ApiClientFactory,
    Informer,
    KubeApi,
    KubeObject,
    KubernetesConflict,
    KubernetesError,
    KubernetesNotFound,
)
from bot.config import Settings

log = logging.getLogger(__name__)

LABEL_PREFIX: Final = "kubeci.dev/"
CONTAINER_NAME: Final = "main"
KUBECI_LOG_SOURCE: Final = "kubeci"
# Waiting reasons that do not clear up by themselves within a task's lifetime.
STUCK_WAITING_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
# Stuck reasons that another attempt cannot fix.
PERMANENT_STUCK_REASONS: Final = frozenset({"InvalidImageName"})
_INLINE_KEYS: Final = frozenset(
    {"image", "command", "args", "resources", "service_account", "image_pull_secrets"}
)
_KNOWN_KEYS: Final = _INLINE_KEYS | {"env", "namespace", "manifest"}
_ENV_NAME: Final = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


class ArgumentError(ValueError):
    """A task argument is missing or has the wrong shape."""


# --- Arguments -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobArguments:
    """The arguments of a kubernetes_job task, checked."""

    image: str = ""
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    service_account: str = ""
    image_pull_secrets: list[str] = field(default_factory=list)
    namespace: str = ""
    manifest: dict[str, Any] | None = None


def _string_list(arguments: Mapping[str, Any], key: str) -> list[str]:
    value = arguments.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(item, str | int | float) and not isinstance(item, bool) for item in value
    ):
        raise ArgumentError(f"{key} must be a list of strings, e.g. {key}: [pytest, -q]")
    return [str(item) for item in value]


def parse_env(value: Any, key: str = "env") -> dict[str, str]:
    """Check an env map of names to strings; raise ArgumentError naming a bad entry."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{key} must be a map of variable names to values")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ArgumentError(
                f"{key} name {name!r} is invalid; use letters, digits, '_', '-' and '.', "
                "not starting with a digit"
            )
        if item is None or isinstance(item, Mapping | list):
            raise ArgumentError(f"{key}.{name} must be a string, not {item!r}")
        env[name] = str(item).lower() if isinstance(item, bool) else str(item)
    return env


def _resources(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or set(value) - {"requests", "limits"}:
        raise ArgumentError(
            "resources must be a map with requests and/or limits, e.g. "
            "resources: {limits: {cpu: '1', memory: 512Mi}}"
        )
    for part, amounts in value.items():
        if not isinstance(amounts, Mapping):
            raise ArgumentError(f"resources.{part} must be a map such as {{cpu: 500m}}")
    return copy.deepcopy(dict(value))


def _pull_secrets(value: Any) -> list[str]:
    if value is None:
        return []
    names: list[str] = []
    for item in value if isinstance(value, list) else [value]:
        name = item.get("name") if isinstance(item, Mapping) else item
        if not isinstance(name, str) or not name:
            raise ArgumentError(
                "image_pull_secrets must be a list of secret names, e.g. [registry-login]"
            )
        names.append(name)
    return names


def _optional_string(arguments: Mapping[str, Any], key: str) -> str:
    value = arguments.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ArgumentError(f"{key} must be a string, not {value!r}")
    return value


def parse_job_arguments(arguments: Mapping[str, Any]) -> JobArguments:
    """Check a kubernetes_job task's arguments; raise ArgumentError naming the problem."""
    unknown = sorted(set(arguments) - _KNOWN_KEYS)
    if unknown:
        raise ArgumentError(
            f"unknown argument(s) {', '.join(unknown)}; kubernetes_job takes "
            f"{', '.join(sorted(_KNOWN_KEYS))}"
        )
    manifest = arguments.get("manifest")
    if manifest is not None:
        used_inline = sorted(_INLINE_KEYS & set(arguments))
        if used_inline:
            raise ArgumentError(
                f"give either manifest or {', '.join(used_inline)}, not both; put the "
                "container settings inside the manifest"
            )
        check_manifest(manifest)
    elif not _optional_string(arguments, "image"):
        raise ArgumentError("image is required (or give a full Job as manifest)")
    return JobArguments(
        image=_optional_string(arguments, "image"),
        command=_string_list(arguments, "command"),
        args=_string_list(arguments, "args"),
        env=parse_env(arguments.get("env")),
        resources=_resources(arguments.get("resources")),
        service_account=_optional_string(arguments, "service_account"),
        image_pull_secrets=_pull_secrets(arguments.get("image_pull_secrets")),
        namespace=_optional_string(arguments, "namespace"),
        manifest=copy.deepcopy(dict(manifest)) if manifest is not None else None,
    )


def check_manifest(manifest: Any) -> None:
    """Check that `manifest` is a batch/v1 Job with at least one container."""
    if not isinstance(manifest, Mapping):
        raise ArgumentError("manifest must be a batch/v1 Job object (a map)")
    if manifest.get("apiVersion") != "batch/v1" or manifest.get("kind") != "Job":
        raise ArgumentError(
            f"manifest must have apiVersion batch/v1 and kind Job, not "
            f"{manifest.get('apiVersion')!r} and {manifest.get('kind')!r}"
        )
    pod_spec = manifest.get("spec", {}).get("template", {}).get("spec", {})
    containers = pod_spec.get("containers") if isinstance(pod_spec, Mapping) else None
    if not isinstance(containers, list) or not containers:
        raise ArgumentError("manifest.spec.template.spec.containers must list a container")
    for index, container in enumerate(containers):
        if not isinstance(container, Mapping) or not container.get("name"):
            raise ArgumentError(f"manifest container {index} needs a name")


# --- Names, labels, manifest ---------------------------------------------------------


def _slug(text: str, max_length: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-")


def label_value(text: str) -> str:
    """Turn `text` into a valid label value: [A-Za-z0-9_.-], at most 63 characters."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def job_name_for(ctx: AttemptContext) -> str:
    """Name the attempt's Job: `kubeci-<task>-<hash>`, a DNS label of at most 63 chars.

    The hash covers the run id, task id and attempt number, so attempts of different
    runs (other branches, other commits) never share a name.
    """
    digest = hashlib.sha256(f"{ctx.run_id}/{ctx.task_id}/{ctx.attempt_number}".encode())
    return f"kubeci-{_slug(ctx.task_name, 45) or 'task'}-{digest.hexdigest()[:10]}"


def job_labels(ctx: AttemptContext) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/managed-by": "kubeci",
        f"{LABEL_PREFIX}run-id": str(ctx.run_id),
        f"{LABEL_PREFIX}task-id": str(ctx.task_id),
        f"{LABEL_PREFIX}attempt": str(ctx.attempt_number),
        f"{LABEL_PREFIX}task": label_value(ctx.task_name),
    }
    for key in ("repository", "sha"):
        value = label_value(str(ctx.labels.get(key) or ""))
        if value:
            labels[f"{LABEL_PREFIX}{key}"] = value
    return labels


def job_annotations(ctx: AttemptContext) -> dict[str, str]:
    run_url = ctx.extra.get("run_url") or ctx.labels.get("run.url")
    values = {
        "repository": ctx.labels.get("repository"),
        "ref": ctx.labels.get("ref"),
        "run-url": run_url,
        "job": ctx.job_name,
        "step": ctx.step_name,
    }
    return {f"{LABEL_PREFIX}{key}": str(value) for key, value in values.items() if value}


def _inline_job(args: JobArguments) -> KubeObject:
    container: KubeObject = {"name": CONTAINER_NAME, "image": args.image}
    if args.command:
        container["command"] = list(args.command)
    if args.args:
        container["args"] = list(args.args)
    if args.resources:
        container["resources"] = copy.deepcopy(args.resources)
    pod_spec: KubeObject = {"restartPolicy": "Never", "containers": [container]}
    if args.service_account:
        pod_spec["serviceAccountName"] = args.service_account
    if args.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in args.image_pull_secrets]
    return {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": pod_spec}}}


def _merge_env(container: KubeObject, env: Mapping[str, str]) -> None:
    others = [item for item in container.get("env") or [] if item.get("name") not in env]
    container["env"] = others + [{"name": name, "value": value} for name, value in env.items()]


def resolve_namespace(args: JobArguments, settings: Settings) -> str:
    manifest_namespace = (args.manifest or {}).get("metadata", {}).get("namespace", "")
    if args.namespace and manifest_namespace and args.namespace != manifest_namespace:
        raise ArgumentError(
            f"namespace {args.namespace!r} differs from the manifest's namespace "
            f"{manifest_namespace!r}; give only one of them"
        )
    return args.namespace or manifest_namespace or settings.kube_namespace


def untrusted_violations(args: JobArguments, namespace: str, settings: Settings) -> list[str]:
    """List what an untrusted run's Job may not use: anything that reaches the cluster's
    secrets or a service account's permissions, or a namespace other than KubeCI's."""
    found = []
    if namespace != settings.kube_namespace:
        found.append(f"namespace {namespace!r} (untrusted Jobs run in {settings.kube_namespace!r})")
    if args.service_account:
        found.append("service_account")
    if args.image_pull_secrets:
        found.append("image_pull_secrets")
    if args.manifest:
        pod_spec = (args.manifest.get("spec") or {}).get("template", {}).get("spec") or {}
        found.extend(_pod_spec_violations(pod_spec))
    return found


def _pod_spec_violations(pod_spec: Mapping[str, Any]) -> list[str]:
    found = []
    for key in ("serviceAccountName", "serviceAccount", "imagePullSecrets"):
        if pod_spec.get(key):
            found.append(f"spec.template.spec.{key}")
    for index, volume in enumerate(pod_spec.get("volumes") or []):
        sources = (volume.get("projected") or {}).get("sources") or []
        uses_secret = "secret" in volume or any(
            "secret" in source or "serviceAccountToken" in source for source in sources
        )
        if uses_secret:
            found.append(f"spec.template.spec.volumes[{index}] ({volume.get('name', '')})")
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(pod_spec.get(kind) or []):
            where = f"spec.template.spec.{kind}[{index}]"
            if any("secretRef" in source for source in container.get("envFrom") or []):
                found.append(f"{where}.envFrom")
            for item in container.get("env") or []:
                if "secretKeyRef" in (item.get("valueFrom") or {}):
                    found.append(f"{where}.env[{item.get('name', '')}]")
    return found


def build_job(
    ctx: AttemptContext, args: JobArguments, name: str, namespace: str, ttl_s: int
) -> KubeObject:
    """Build the Job: the manifest (or the inline container) plus KubeCI's metadata.

    KubeCI sets the name, namespace, labels and annotations, the callback variables,
    and an activeDeadlineSeconds no longer than the attempt's timeout. backoffLimit
    (default 0: KubeCI retries by attempts) and ttlSecondsAfterFinished (a safety net
    should KubeCI never delete the Job) keep a manifest's own values.
    """
    job = copy.deepcopy(args.manifest) if args.manifest else _inline_job(args)
    metadata = job.setdefault("metadata", {})
    metadata.pop("generateName", None)
    metadata.update(name=name, namespace=namespace)
    labels = job_labels(ctx)
    metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **job_annotations(ctx)}

    spec = job.setdefault("spec", {})
    spec.setdefault("backoffLimit", 0)
    spec.setdefault("ttlSecondsAfterFinished", ttl_s)
    deadline_s = max(1, math.ceil(ctx.timeout_s))
    spec["activeDeadlineSeconds"] = min(
        int(spec.get("activeDeadlineSeconds") or deadline_s), deadline_s
    )

    template = spec.setdefault("template", {})
    template_metadata = template.setdefault("metadata", {})
    template_metadata["labels"] = {**(template_metadata.get("labels") or {}), **labels}
    pod_spec = template.setdefault("spec", {})
    pod_spec.setdefault("restartPolicy", "Never")
    if not ctx.trusted:
        # No service account token either: untrusted code gets no API credentials.
        pod_spec["automountServiceAccountToken"] = False

    env = dict(args.env)
    if ctx.callback_url:
        env["KUBECI_CALLBACK_URL"] = ctx.callback_url
    if ctx.callback_token:
        env["KUBECI_CALLBACK_TOKEN"] = ctx.callback_token
    for container in pod_spec.get("containers") or []:
        _merge_env(container, env)
    return job


# --- Pod inspection ------------------------------------------------------------------


def pod_selector(job: KubeObject, name: str) -> str:
    """Return the label selector of the Job's pods (from spec.selector, as the controller)."""
    match_labels = job.get("spec", {}).get("selector", {}).get("matchLabels") or {}
    if match_labels:
        return ",".join(f"{key}={value}" for key, value in sorted(match_labels.items()))
    return f"job-name={name}"


def container_statuses(pod: KubeObject) -> list[KubeObject]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )


def started_containers(pod: KubeObject) -> list[str]:
    """Return the names of the pod's containers (init ones first) that have a log."""
    names = []
    for status in container_statuses(pod):
        state = status.get("state") or {}
        last = status.get("lastState") or {}
        if "running" in state or "terminated" in state or "terminated" in last:
            names.append(str(status.get("name")))
    return names


@dataclass(frozen=True)
class StuckPod:
    """A pod that cannot make progress: a waiting container or an unschedulable pod."""

    key: str
    pod: str
    reason: str
    message: str
    summary: str


def stuck_pods(pods: Iterable[KubeObject]) -> list[StuckPod]:
    found = []
    for pod in pods:
        name = str(pod.get("metadata", {}).get("name"))
        for status in container_statuses(pod):
            waiting = (status.get("state") or {}).get("waiting") or {}
            reason = str(waiting.get("reason") or "")
            if reason in STUCK_WAITING_REASONS:
                container = str(status.get("name"))
                summary = f"container {container} is waiting with {reason}"
                message = str(waiting.get("message") or "")
                found.append(StuckPod(f"{name}/{container}", name, reason, message, summary))
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                message = str(condition.get("message") or "")
                found.append(StuckPod(f"{name}/", name, "Unschedulable", message, "unschedulable"))
    return found


class StuckTracker:
    """The time each pod became stuck, to fail the Job after a grace period."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.clock = clock
        self._since: dict[str, float] = {}
        self._current: dict[str, StuckPod] = {}

    def update(self, pods: Iterable[KubeObject]) -> None:
        now = self.clock()
        self._current = {stuck.key: stuck for stuck in stuck_pods(pods)}
        self._since = {key: self._since.get(key, now) for key in self._current}

    def expired(self) -> StuckPod | None:
        now = self.clock()
        for key, since in self._since.items():
            if now - since >= self.grace_s:
                return self._current[key]
        return None

    def seconds_to_next_expiry(self) -> float | None:
        if not self._since:
            return None
        return max(0.0, min(self._since.values()) + self.grace_s - self.clock())


def describe_failed_containers(pods: Iterable[KubeObject]) -> tuple[list[str], str | None]:
    """Describe containers that exited non-zero and failed pods; return the first's key."""
    lines: list[str] = []
    first: str | None = None
    for pod in pods:
        name = str(pod.get("metadata", {}).get("name"))
        for status in container_statuses(pod):
            state = status.get("state") or {}
            terminated = state.get("terminated") or (status.get("lastState") or {}).get(
                "terminated"
            )
            if terminated and terminated.get("exitCode", 0) != 0:
                container = str(status.get("name"))
                reason = terminated.get("reason") or "Error"
                lines.append(
                    f"container {container} in pod {name} exited with code "
                    f"{terminated.get('exitCode')} ({reason})"
                )
                first = first or f"{name}/{container}"
        pod_status = pod.get("status") or {}
        if pod_status.get("reason"):
            lines.append(f"pod {name}: {pod_status['reason']}: {pod_status.get('message', '')}")
    return lines, first


# --- Logs ----------------------------------------------------------------------------


@dataclass
class _ContainerLog:
    pod: str
    container: str
    sent_bytes: int = 0
    pending: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    tail: str = ""
    stream: asyncio.Task[None] | None = None

    @property
    def source(self) -> str:
        return f"{self.pod}/{self.container}"


class PodLogs:
    """Log collection for a Job: live streams into the attempt log, then full reads.

    Each container's log is cut at `cap_bytes`, with a marker saying so. The final
    full read appends what the live stream missed (a broken stream, a container that
    ended before it was followed, a process that re-attached).

    NOTE: after a re-attach, log text that the earlier process already stored is
    stored again, because the offsets sent so far live only in this object.
    """

    MAX_PENDING_BYTES: Final = 64 * 1024
    TAIL_CHARS: Final = 4000

    def __init__(self, api: KubeApi, ctx: AttemptContext, namespace: str, cap_bytes: int) -> None:
        self.api = api
        self.ctx = ctx
        self.namespace = namespace
        self.cap_bytes = cap_bytes
        self.ids = log_ids(ctx)
        self._logs: dict[str, _ContainerLog] = {}

    def tail(self, key: str) -> str:
        entry = self._logs.get(key)
        return entry.tail if entry else ""

    def follow(self, pods: Iterable[KubeObject]) -> None:
        """Start a log stream for every started container not yet followed."""
        for pod in pods:
            pod_name = str(pod.get("metadata", {}).get("name"))
            for container in started_containers(pod):
                entry = self._entry(pod_name, container)
                if entry.stream is None:
                    entry.stream = asyncio.create_task(self._stream(entry))

    def _entry(self, pod: str, container: str) -> _ContainerLog:
        key = f"{pod}/{container}"
        if key not in self._logs:
            self._logs[key] = _ContainerLog(pod, container)
        return self._logs[key]

    async def _stream(self, entry: _ContainerLog) -> None:
        try:
            async with aclosing(
                self.api.follow_pod_log(self.namespace, entry.pod, entry.container)
            ) as chunks:
                async for chunk in chunks:
                    await self._append(entry, chunk, final=False)
                    if entry.truncated:
                        return
            await self._append(entry, b"", final=True)
        except KubernetesError as exc:
            log.info("log stream of %s ended early: %s", entry.source, exc, extra=log_ids(self.ctx))

    async def _append(self, entry: _ContainerLog, data: bytes, *, final: bool) -> None:
        if entry.truncated:
            return
        entry.pending += data
        cut = len(entry.pending) if final else entry.pending.rfind(b"\n") + 1
        if cut == 0 and len(entry.pending) > self.MAX_PENDING_BYTES:
            # A very long line: cut before a UTF-8 continuation byte, never inside a character.
            cut = len(entry.pending)
            while cut > 0 and entry.pending[cut - 1] & 0xC0 == 0x80:
                cut -= 1
        if cut == 0:
            return
        chunk = bytes(entry.pending[:cut])
        del entry.pending[:cut]
        room = self.cap_bytes - entry.sent_bytes
        if len(chunk) > room:
            chunk, entry.truncated = chunk[:room], True
        entry.sent_bytes += len(chunk)
        text = chunk.decode("utf-8", "replace")
        if text:
            await self.ctx.append_log(entry.source, text)
        if entry.truncated:
            marker = f"\n[log cut: longer than {self.cap_bytes} bytes]\n"
            await self.ctx.append_log(entry.source, marker)
            text += marker
        entry.tail = (entry.tail + text)[-self.TAIL_CHARS :]

    async def stop_streams(self, grace_s: float) -> None:
        """Wait up to `grace_s` for the live streams to end, then cancel the rest."""
        tasks = [entry.stream for entry in self._logs.values() if entry.stream]
        if not tasks:
            return
        if grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def read_all(self, pods: Iterable[KubeObject]) -> None:
        """Read every started container's log in full and append what was not sent."""
        for pod in pods:
            pod_name = str(pod.get("metadata", {}).get("name"))
            for container in started_containers(pod):
                await self._read_one(self._entry(pod_name, container))

    async def _read_one(self, entry: _ContainerLog) -> None:
        if entry.truncated:
            return
        try:
            data = await self.api.read_pod_log(
                self.namespace, entry.pod, entry.container, limit_bytes=self.cap_bytes + 1
            )
        except KubernetesError as exc:
            log.warning("cannot read the log of %s: %s", entry.source, exc, extra=log_ids(self.ctx))
            await self.ctx.append_log(entry.source, f"[log unavailable: {exc.message}]\n")
            return
        entry.pending.clear()
        await self._append(entry, data[entry.sent_bytes :], final=True)


# --- Following a Job -----------------------------------------------------------------


def log_ids(ctx: AttemptContext) -> dict[str, int]:
    return {"run_id": ctx.run_id, "task_id": ctx.task_id, "attempt_id": ctx.attempt_id}


@dataclass(frozen=True)
class JobOutcome:
    """The end of a Job, stored in the attempt's data before the Job is deleted."""

    succeeded: bool
    message: str
    retryable: bool = True
    # "<pod>/<container>" of the container whose log tail explains a failure.
    log_key: str | None = None
    excerpt: str | None = None

    def to_result(self) -> AttemptResult:
        if self.succeeded:
            return AttemptResult.success(self.message)
        return AttemptResult.failure(
            self.message, retryable=self.retryable, response_excerpt=self.excerpt
        )

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> JobOutcome:
        return cls(
            succeeded=bool(data.get("succeeded")),
            message=str(data.get("message", "")),
            retryable=bool(data.get("retryable", True)),
            excerpt=data.get("excerpt"),
        )


def finished_condition(job: KubeObject) -> KubeObject | None:
    """Return the Job's Complete or Failed condition once it is True."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return dict(condition)
    return None


class JobFollower:
    """Follower of one Job and its pods, until the Job finishes or a pod stays stuck."""

    def __init__(
        self, api: KubeApi, namespace: str, job: KubeObject, logs: PodLogs, stuck: StuckTracker
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.job = job
        self.name = str(job["metadata"]["name"])
        self.logs = logs
        self.stuck = stuck
        self.pods: dict[str, KubeObject] = {}

    async def run(self) -> JobOutcome:
        jobs = self.api.informer(
            "jobs", self.namespace, field_selector=f"metadata.name={self.name}"
        )
        pods = self.api.informer(
            "pods", self.namespace, label_selector=pod_selector(self.job, self.name)
        )
        queue: asyncio.Queue[BaseException | None] = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(informer, queue)) for informer in (jobs, pods)]
        try:
            while True:
                await self._next_change(queue)
                if not jobs.lists or not pods.lists:
                    continue
                self.pods = pods.objects
                self.logs.follow(self.pods.values())
                outcome = await self._decide(jobs.objects.get(self.name))
                if outcome is not None:
                    return outcome
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def current_pods(self) -> list[KubeObject]:
        """List the Job's pods afresh: the pod watch may lag behind the Job's end."""
        try:
            return await self.api.list_pods(self.namespace, pod_selector(self.job, self.name))
        except KubernetesError as exc:
            log.warning("cannot list the pods of Job %s: %s", self.name, exc, extra=self.logs.ids)
            return list(self.pods.values())

    @staticmethod
    async def _pump(informer: Informer, queue: asyncio.Queue[BaseException | None]) -> None:
        try:
            async with aclosing(informer.changes()) as changes:
                async for _ in changes:
                    queue.put_nowait(None)
        except Exception as exc:  # handed over to run(), which raises it
            queue.put_nowait(exc)

    async def _next_change(self, queue: asyncio.Queue[BaseException | None]) -> None:
        """Wait for a change, or until the grace period of a stuck pod ends."""
        try:
            async with asyncio.timeout(self.stuck.seconds_to_next_expiry()):
                item = await queue.get()
        except TimeoutError:
            return
        if item is not None:
            raise item

    async def _decide(self, job: KubeObject | None) -> JobOutcome | None:
        where = f"{self.namespace}/{self.name}"
        if job is None:
            return JobOutcome(False, f"Job {where} was deleted before it finished")
        condition = finished_condition(job)
        if condition is not None:
            fresh = await self.current_pods()
            self.pods = {str(pod["metadata"]["name"]): pod for pod in fresh}
            return self._finished(condition)
        self.stuck.update(self.pods.values())
        stuck = self.stuck.expired()
        if stuck is None:
            return None
        detail = f": {stuck.message}" if stuck.message else ""
        return JobOutcome(
            False,
            f"Job {where} failed early: pod {stuck.pod} {stuck.summary} for more than "
            f"{self.stuck.grace_s:g} s ({stuck.reason}{detail})",
            retryable=stuck.reason not in PERMANENT_STUCK_REASONS,
        )

    def _finished(self, condition: KubeObject) -> JobOutcome:
        where = f"{self.namespace}/{self.name}"
        if condition.get("type") == "Complete":
            return JobOutcome(True, f"Job {where} completed")
        pods = sorted(
            self.pods.values(), key=lambda pod: pod["metadata"].get("creationTimestamp", "")
        )
        lines, failed = describe_failed_containers(pods)
        message = f"Job {where} failed: {condition.get('reason') or 'Failed'}"
        if condition.get("message"):
            message += f": {condition['message']}"
        if lines:
            message += "; " + "; ".join(lines)
        return JobOutcome(False, message, log_key=failed)


# --- The action ----------------------------------------------------------------------


@dataclass(frozen=True)
class JobActionOptions:
    """Limits of the kubernetes_job action; tests shrink them."""

    log_cap_bytes: int = 1024 * 1024
    # After a cancellation: the longest time spent reading logs before deleting the Job.
    log_collect_timeout_s: float = 10.0
    # After the Job ends: how long the live log streams get to reach their end.
    log_stream_grace_s: float = 5.0
    ttl_after_finished_s: int = 3600
    request_timeout_s: float = 30.0
    watch_timeout_s: int = 300


async def run_to_end(coroutine: Coroutine[Any, Any, None]) -> None:
    """Await `coroutine` in its own task, finishing it even when cancelled meanwhile.

    Re-raises CancelledError afterwards when a cancellation arrived while waiting.
    """
    task: asyncio.Task[None] = asyncio.create_task(coroutine)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


class _JobAttempt:
    """One execution of one attempt: create or find the Job, follow it, clean up."""

    def __init__(
        self,
        action: KubernetesJobAction,
        api: KubeApi,
        ctx: AttemptContext,
        args: JobArguments,
        namespace: str,
        name: str,
    ) -> None:
        self.options = action.options
        self.settings = action.settings
        self.api = api
        self.ctx = ctx
        self.args = args
        self.namespace = namespace
        self.name = name
        self.where = f"{namespace}/{name}"

    async def run(self) -> AttemptResult:
        stored = self.ctx.data.get("outcome")
        if isinstance(stored, Mapping):
            # An earlier execution finished the Job but stopped before deleting it.
            log.info("Job %s already finished; deleting it", self.where, extra=log_ids(self.ctx))
            await self._delete_quietly()
            return JobOutcome.from_data(stored).to_result()
        try:
            job = await self._create_or_attach()
        except asyncio.CancelledError:
            # The create request may have reached the API server before the cancellation.
            if not self.ctx.handing_back:
                await run_to_end(self._delete_quietly())
            raise
        if isinstance(job, AttemptResult):
            return job
        logs = PodLogs(self.api, self.ctx, self.namespace, self.options.log_cap_bytes)
        follower = JobFollower(
            self.api, self.namespace, job, logs, StuckTracker(self.settings.stuck_pod_grace_s)
        )
        try:
            outcome = await follower.run()
            await logs.stop_streams(self.options.log_stream_grace_s)
            await logs.read_all(list(follower.pods.values()))
        except asyncio.CancelledError:
            if not self.ctx.handing_back:
                await run_to_end(self._clean_up(logs, follower))
            raise
        except Exception:
            await run_to_end(self._clean_up(logs, follower))
            raise
        if outcome.log_key:
            tail = logs.tail(outcome.log_key)
            outcome = JobOutcome(**{**asdict(outcome), "excerpt": self.ctx.mask(tail) or None})
        await self._save(outcome=asdict(outcome))
        await self._delete_quietly()
        log.info("Job %s: %s", self.where, outcome.message, extra=log_ids(self.ctx))
        return outcome.to_result()

    async def _save(self, **values: Any) -> None:
        self.ctx.data.update(values)
        await self.ctx.save_data(dict(self.ctx.data))

    async def _note(self, text: str) -> None:
        await self.ctx.append_log(KUBECI_LOG_SOURCE, text + "\n")

    async def _create_or_attach(self) -> KubeObject | AttemptResult:
        if self.ctx.recovered or self.ctx.data.get("job_name"):
            try:
                return await self._attach(await self.api.read_job(self.namespace, self.name))
            except KubernetesNotFound:
                log.info("Job %s not found; creating it", self.where, extra=log_ids(self.ctx))
        await self._save(job_name=self.name, namespace=self.namespace)
        body = build_job(
            self.ctx, self.args, self.name, self.namespace, self.options.ttl_after_finished_s
        )
        try:
            job = await self.api.create_job(self.namespace, body)
        except KubernetesConflict:
            return await self._attach(await self.api.read_job(self.namespace, self.name))
        log.info("created Job %s", self.where, extra=log_ids(self.ctx))
        await self._note(f"Created Job {self.where}")
        return job

    async def _attach(self, job: KubeObject) -> KubeObject | AttemptResult:
        labels = job.get("metadata", {}).get("labels") or {}
        expected = job_labels(self.ctx)
        keys = [f"{LABEL_PREFIX}{key}" for key in ("run-id", "task-id", "attempt")]
        if any(labels.get(key) != expected[key] for key in keys):
            log.warning("Job %s belongs to another attempt", self.where, extra=log_ids(self.ctx))
            return AttemptResult.failure(
                f"Job {self.where} exists but was not created for this attempt (its labels "
                f"differ); delete it or run the task in another namespace",
                retryable=False,
            )
        log.info("re-attached to Job %s", self.where, extra=log_ids(self.ctx))
        await self._note(f"Re-attached to the existing Job {self.where}")
        return job

    async def _clean_up(self, logs: PodLogs, follower: JobFollower) -> None:
        """After a cancellation or an error: keep what logs we can, then delete the Job."""
        try:
            async with asyncio.timeout(self.options.log_collect_timeout_s):
                await logs.stop_streams(0)
                await logs.read_all(await follower.current_pods())
        except (TimeoutError, KubernetesError) as exc:
            log.warning(
                "stopped collecting the logs of Job %s: %r",
                self.where,
                exc,
                extra=log_ids(self.ctx),
            )
        await self._delete_quietly()

    async def _delete_quietly(self) -> None:
        try:
            await self.api.delete_job(self.namespace, self.name)
        except KubernetesNotFound:
            return
        except KubernetesError as exc:
            # ttlSecondsAfterFinished removes the Job later, so the outcome is kept.
            log.warning("cannot delete Job %s: %s", self.where, exc, extra=log_ids(self.ctx))
            await self._note(f"Could not delete Job {self.where}: {exc.message}")
            return
        log.info("deleted Job %s", self.where, extra=log_ids(self.ctx))


class KubernetesJobAction:
    """Runs a task as a batch/v1 Job (see the module docstring)."""

    name = "kubernetes_job"
    uses_callback = True

    def __init__(
        self,
        settings: Settings,
        api_client_factory: ApiClientFactory,
        options: JobActionOptions | None = None,
    ) -> None:
        self.settings = settings
        self.api_client_factory = api_client_factory
        self.options = options or JobActionOptions()

    async def _connect(self) -> KubeApi:
        return KubeApi(
            await self.api_client_factory(),
            request_timeout_s=self.options.request_timeout_s,
            watch_timeout_s=self.options.watch_timeout_s,
        )

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        try:
            args = parse_job_arguments(ctx.arguments)
            namespace = str(ctx.data.get("namespace") or resolve_namespace(args, self.settings))
        except ArgumentError as exc:
            log.info("invalid kubernetes_job arguments: %s", exc, extra=log_ids(ctx))
            return AttemptResult.failure(f"kubernetes_job: {exc}", retryable=False)
        if not ctx.trusted:
            refused = untrusted_violations(args, namespace, self.settings)
            if refused:
                message = (
                    "kubernetes_job: runs of untrusted pull requests may not use "
                    + ", ".join(refused)
                    + "; such runs get no secrets or service accounts of the cluster"
                )
                log.warning("%s", message, extra=log_ids(ctx))
                return AttemptResult.failure(message, retryable=False)
        name = str(ctx.data.get("job_name") or job_name_for(ctx))
        try:
            async with await self._connect() as api:
                return await _JobAttempt(self, api, ctx, args, namespace, name).run()
        except KubernetesError as exc:
            log.warning("Job %s/%s failed: %s", namespace, name, exc, extra=log_ids(ctx))
            return AttemptResult.failure(
                exc.message, retryable=exc.retryable, response_status=exc.status
            )

    async def cancel(self, ctx: AttemptContext) -> None:
        """Delete the attempt's Job (and its pods); a Job already gone is fine."""
        name = str(ctx.data.get("job_name") or job_name_for(ctx))
        namespace = str(ctx.data.get("namespace") or "")
        if not namespace:
            try:
                namespace = resolve_namespace(parse_job_arguments(ctx.arguments), self.settings)
            except ArgumentError:
                namespace = self.settings.kube_namespace
        try:
            async with await self._connect() as api:
                await api.delete_job(namespace, name)
        except KubernetesNotFound:
            return
        except KubernetesError as exc:
            log.warning("cannot delete Job %s/%s: %s", namespace, name, exc, extra=log_ids(ctx))
            return
        log.info("deleted Job %s/%s of a cancelled attempt", namespace, name, extra=log_ids(ctx))
