"""The kubernetes_deployment action: update a Deployment and wait for its rollout.

The action sets container images (by container name), the replica count and
environment variables (a null value removes one) with a strategic merge patch. Before
patching it stores the current pod template and replica count in the attempt's data,
so a re-execution after a crash neither patches twice nor loses the rollback target.
It then watches the Deployment until the rollout is complete, the controller reports
ProgressDeadlineExceeded, or the attempt's own deadline comes, and with
`rollback_on_failure` restores the stored pod template after a failure.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Iterable, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from bot.actions.base import AttemptContext, AttemptResult, refuse_untrusted
from bot.actions.kube_client import ApiClientFactory, KubeApi, KubeObject, KubernetesError
from bot.actions.kubernetes_job import ArgumentError, container_statuses, log_ids, parse_env
from bot.config import Settings

log = logging.getLogger(__name__)

_KNOWN_KEYS: Final = frozenset(
    {"namespace", "name", "images", "replicas", "env", "rollback_on_failure"}
)
# Waiting reasons every starting pod goes through; they explain no failure.
_ROUTINE_WAITING: Final = frozenset({"ContainerCreating", "PodInitializing"})
MAX_POD_PROBLEMS: Final = 5


# --- Arguments -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentArguments:
    """The arguments of a kubernetes_deployment task, checked."""

    name: str
    namespace: str
    images: dict[str, str] = field(default_factory=dict)
    replicas: int | None = None
    # A None value removes the variable.
    env: dict[str, str | None] = field(default_factory=dict)
    rollback_on_failure: bool = False


def _images(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(image, str) and image for image in value.values()
    ):
        raise ArgumentError(
            "images must map container names to images, e.g. images: {web: 'registry/web:1.2'}"
        )
    return {str(name): str(image) for name, image in value.items()}


def _replicas(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError(f"replicas must be a whole number of at least 0, not {value!r}")
    return value


def _env_changes(value: Any) -> dict[str, str | None]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentError("env must be a map of variable names to values (null removes one)")
    removed = [name for name, item in value.items() if item is None]
    kept = parse_env({name: item for name, item in value.items() if item is not None})
    changes: dict[str, str | None] = dict(kept)
    for name in removed:
        parse_env({name: ""})  # checks the name
        changes[name] = None
    return changes


def checked_deployment_arguments(
    ctx: AttemptContext, settings: Settings
) -> DeploymentArguments | AttemptResult:
    """Return the task's checked arguments, or the failure that ends the attempt at once:
    an untrusted run, or invalid arguments. Both deployment backends start with this."""
    refused = refuse_untrusted(
        ctx, "kubernetes_deployment", "it would deploy code nobody with write access approved"
    )
    if refused is not None:
        return refused
    try:
        return parse_deployment_arguments(ctx.arguments, settings)
    except ArgumentError as exc:
        log.info("invalid kubernetes_deployment arguments: %s", exc, extra=log_ids(ctx))
        return AttemptResult.failure(f"kubernetes_deployment: {exc}", retryable=False)


def parse_deployment_arguments(
    arguments: Mapping[str, Any], settings: Settings
) -> DeploymentArguments:
    """Check a kubernetes_deployment task's arguments; raise ArgumentError naming the problem."""
    unknown = sorted(set(arguments) - _KNOWN_KEYS)
    if unknown:
        raise ArgumentError(
            f"unknown argument(s) {', '.join(unknown)}; kubernetes_deployment takes "
            f"{', '.join(sorted(_KNOWN_KEYS))}"
        )
    name = arguments.get("name")
    if not isinstance(name, str) or not name:
        raise ArgumentError("name is required: the name of the Deployment to update")
    namespace = arguments.get("namespace") or settings.kube_namespace
    if not isinstance(namespace, str):
        raise ArgumentError(f"namespace must be a string, not {namespace!r}")
    rollback = arguments.get("rollback_on_failure", False)
    if not isinstance(rollback, bool):
        raise ArgumentError(f"rollback_on_failure must be true or false, not {rollback!r}")
    parsed = DeploymentArguments(
        name=name,
        namespace=namespace,
        images=_images(arguments.get("images")),
        replicas=_replicas(arguments.get("replicas")),
        env=_env_changes(arguments.get("env")),
        rollback_on_failure=rollback,
    )
    if not parsed.images and parsed.replicas is None and not parsed.env:
        raise ArgumentError("give at least one of images, replicas or env to update")
    return parsed


# --- Updates -------------------------------------------------------------------------


def updated_env(current: list[KubeObject], changes: Mapping[str, str | None]) -> list[KubeObject]:
    """Apply env changes: set values in place (dropping valueFrom), remove None ones."""
    result: list[KubeObject] = []
    for item in current:
        name = str(item.get("name"))
        if name not in changes:
            result.append(item)
        elif changes[name] is not None:
            result.append({"name": name, "value": changes[name]})
    present = {item.get("name") for item in current}
    for name, value in changes.items():
        if name not in present and value is not None:
            result.append({"name": name, "value": value})
    return result


def updated_template(template: KubeObject, args: DeploymentArguments) -> KubeObject:
    """Return the pod template as it should be after the update."""
    result = copy.deepcopy(template)
    pod_spec = result.setdefault("spec", {})
    for container in pod_spec.get("initContainers") or []:
        container["image"] = args.images.get(container["name"], container.get("image"))
    for container in pod_spec.get("containers") or []:
        container["image"] = args.images.get(container["name"], container.get("image"))
        env = updated_env(list(container.get("env") or []), args.env)
        if env != list(container.get("env") or []):
            container["env"] = env
    return result


def _env_patch(current: list[KubeObject], changes: Mapping[str, str | None]) -> list[KubeObject]:
    existing = {item.get("name"): item for item in current}
    patch: list[KubeObject] = []
    for name, value in changes.items():
        old = existing.get(name)
        if value is None:
            if old is not None:
                patch.append({"name": name, "$patch": "delete"})
        elif old is None or old.get("value") != value or "valueFrom" in old:
            item: KubeObject = {"name": name, "value": value}
            if old is not None and "valueFrom" in old:
                item["valueFrom"] = None  # a null deletes the field in a strategic merge
            patch.append(item)
    return patch


def _containers_patch(
    containers: Iterable[KubeObject], args: DeploymentArguments, *, with_env: bool
) -> list[KubeObject]:
    patch = []
    for container in containers:
        entry: KubeObject = {"name": container["name"]}
        image = args.images.get(container["name"])
        if image is not None and image != container.get("image"):
            entry["image"] = image
        env = _env_patch(list(container.get("env") or []), args.env) if with_env else []
        if env:
            entry["env"] = env
        if len(entry) > 1:
            patch.append(entry)
    return patch


def strategic_patch(deployment: KubeObject, args: DeploymentArguments) -> KubeObject:
    """Build the strategic merge patch that applies `args` to `deployment`."""
    spec = deployment.get("spec") or {}
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    patch_spec: KubeObject = {}
    if args.replicas is not None and args.replicas != spec.get("replicas", 1):
        patch_spec["replicas"] = args.replicas
    pod_patch: KubeObject = {}
    init = _containers_patch(pod_spec.get("initContainers") or [], args, with_env=False)
    if init:
        pod_patch["initContainers"] = init
    containers = _containers_patch(pod_spec.get("containers") or [], args, with_env=True)
    if containers:
        pod_patch["containers"] = containers
    if pod_patch:
        patch_spec["template"] = {"spec": pod_patch}
    return {"spec": patch_spec}


# --- Rollout status ------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutStatus:
    """The progress of a rollout, judged as `kubectl rollout status` does."""

    done: bool
    progress: str
    failure: str | None = None


def rollout_status(deployment: KubeObject) -> RolloutStatus:
    metadata = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    generation = int(metadata.get("generation") or 0)
    if int(status.get("observedGeneration") or 0) < generation:
        return RolloutStatus(
            False, f"waiting for the controller to observe generation {generation}"
        )
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and (
            condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            failure = f"ProgressDeadlineExceeded: {condition.get('message') or 'no progress'}"
            return RolloutStatus(False, "past its progress deadline", failure)
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < desired:
        return RolloutStatus(False, f"{updated} of {desired} replicas updated")
    if total > updated:
        return RolloutStatus(False, f"{total - updated} old replicas are pending termination")
    if available < desired or ready < desired:
        return RolloutStatus(False, f"{min(available, ready)} of {desired} updated replicas ready")
    return RolloutStatus(True, f"{desired} replicas updated and available")


def label_selector(selector: KubeObject) -> str:
    """Turn a LabelSelector object into the string form of list requests."""
    terms = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = ",".join(expression.get("values") or [])
        if operator == "In":
            terms.append(f"{key} in ({values})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({values})")
        elif operator == "Exists":
            terms.append(str(key))
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def pod_problems(pods: Iterable[KubeObject]) -> list[str]:
    """Describe why pods are not ready: waiting reasons, crashes, scheduling."""
    problems = []
    for pod in pods:
        name = pod.get("metadata", {}).get("name")
        for status in container_statuses(pod):
            waiting = (status.get("state") or {}).get("waiting") or {}
            last = (status.get("lastState") or {}).get("terminated") or {}
            reason = waiting.get("reason")
            if reason and reason not in _ROUTINE_WAITING:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                problems.append(f"pod {name} container {status.get('name')} {reason}{detail}")
            if last.get("exitCode"):
                problems.append(
                    f"pod {name} container {status.get('name')} last exited with code "
                    f"{last['exitCode']} ({last.get('reason') or 'Error'})"
                )
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                problems.append(f"pod {name} unschedulable: {condition.get('message', '')}")
    return problems


# --- The action ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentActionOptions:
    """Limits of the kubernetes_deployment action; tests shrink them."""

    request_timeout_s: float = 30.0
    watch_timeout_s: int = 300
    # Time kept back from the attempt's deadline to report the failure and roll back.
    deadline_margin_s: float = 10.0


@dataclass(frozen=True)
class RolloutOutcome:
    succeeded: bool
    message: str
    retryable: bool = True

    def to_result(self) -> AttemptResult:
        if self.succeeded:
            return AttemptResult.success(self.message)
        return AttemptResult.failure(self.message, retryable=self.retryable)


class _Rollout:
    """One execution of one attempt: patch the Deployment, wait, roll back on failure."""

    def __init__(
        self,
        api: KubeApi,
        ctx: AttemptContext,
        args: DeploymentArguments,
        options: DeploymentActionOptions,
    ) -> None:
        self.api = api
        self.ctx = ctx
        self.args = args
        self.options = options
        self.where = f"{args.namespace}/{args.name}"

    async def run(self) -> RolloutOutcome:
        stored = self.ctx.data.get("outcome")
        if isinstance(stored, Mapping):
            return RolloutOutcome(**stored)
        deployment = await self.api.read_deployment(self.args.namespace, self.args.name)
        missing = self._missing_containers(deployment)
        if missing:
            log.info("%s", missing, extra=log_ids(self.ctx))
            return RolloutOutcome(False, missing, retryable=False)
        spec = deployment.get("spec") or {}
        template = spec.get("template") or {}
        replicas = int(spec.get("replicas", 1))
        requested_replicas = replicas if self.args.replicas is None else self.args.replicas
        changed = (
            updated_template(template, self.args) != template or requested_replicas != replicas
        )
        previous = self.ctx.data.get("previous")
        if previous is None:
            if not changed:
                message = f"Deployment {self.where} already matches the update: nothing to change"
                return RolloutOutcome(True, message)
            previous = {"template": template, "replicas": replicas}
            await self._save(previous=previous)
        if changed:
            patch = strategic_patch(deployment, self.args)
            await self.api.patch_deployment(self.args.namespace, self.args.name, patch)
            log.info("patched Deployment %s", self.where, extra=log_ids(self.ctx))
            await self._note(f"Patched Deployment {self.where}: {patch}")
        try:
            outcome = await self._wait()
        except KubernetesError as exc:
            # The rollout's state is unknown, which counts as a failure for the rollback.
            log.warning("watching %s failed: %s", self.where, exc, extra=log_ids(self.ctx))
            outcome = RolloutOutcome(False, exc.message, exc.retryable)
        if not outcome.succeeded and self.args.rollback_on_failure:
            outcome = await self._roll_back(outcome, previous)
        await self._save(outcome=asdict(outcome))
        return outcome

    def _missing_containers(self, deployment: KubeObject) -> str:
        pod_spec = (deployment.get("spec") or {}).get("template", {}).get("spec") or {}
        containers = list(pod_spec.get("initContainers") or []) + list(
            pod_spec.get("containers") or []
        )
        names = [str(container.get("name")) for container in containers]
        missing = sorted(set(self.args.images) - set(names))
        if not missing:
            return ""
        return (
            f"Deployment {self.where} has no container named {', '.join(missing)}; "
            f"its containers are {', '.join(names)}"
        )

    async def _save(self, **values: Any) -> None:
        self.ctx.data.update(values)
        await self.ctx.save_data(dict(self.ctx.data))

    async def _note(self, text: str) -> None:
        await self.ctx.append_log("kubeci", text + "\n")

    async def _wait(self) -> RolloutOutcome:
        """Watch the Deployment until its rollout ends or the attempt's deadline comes."""
        margin_s = min(self.options.deadline_margin_s, self.ctx.remaining_s * 0.1)
        deadline_s = max(0.0, self.ctx.remaining_s - margin_s)
        informer = self.api.informer(
            "deployments", self.args.namespace, field_selector=f"metadata.name={self.args.name}"
        )
        status = RolloutStatus(False, "no status seen yet")
        deployment: KubeObject | None = None
        try:
            async with asyncio.timeout(deadline_s), aclosing(informer.changes()) as changes:
                async for _ in changes:
                    deployment = informer.objects.get(self.args.name)
                    if deployment is None:
                        break
                    status = rollout_status(deployment)
                    if status.done or status.failure:
                        break
        except TimeoutError:
            reason = f"did not finish within {deadline_s:g} s ({status.progress})"
            return await self._failed(informer.objects.get(self.args.name), reason)
        if deployment is None:
            return RolloutOutcome(False, f"Deployment {self.where} was deleted during the rollout")
        if status.done:
            return RolloutOutcome(True, f"Deployment {self.where}: {status.progress}")
        return await self._failed(deployment, f"failed: {status.failure}")

    async def _failed(self, deployment: KubeObject | None, reason: str) -> RolloutOutcome:
        message = f"rollout of Deployment {self.where} {reason}"
        selector = ((deployment or {}).get("spec") or {}).get("selector") or {}
        if selector:
            try:
                pods = await self.api.list_pods(self.args.namespace, label_selector(selector))
            except KubernetesError as exc:
                log.warning(
                    "cannot list the pods of %s: %s", self.where, exc, extra=log_ids(self.ctx)
                )
                pods = []
            problems = pod_problems(pods)
            if problems:
                more = len(problems) - MAX_POD_PROBLEMS
                message += "; " + "; ".join(problems[:MAX_POD_PROBLEMS])
                message += f"; and {more} more" if more > 0 else ""
        log.info("%s", message, extra=log_ids(self.ctx))
        return RolloutOutcome(False, message)

    async def _roll_back(
        self, outcome: RolloutOutcome, previous: Mapping[str, Any]
    ) -> RolloutOutcome:
        patch: list[KubeObject] = [
            {"op": "replace", "path": "/spec/template", "value": previous["template"]}
        ]
        if self.args.replicas is not None:
            patch.append({"op": "replace", "path": "/spec/replicas", "value": previous["replicas"]})
        try:
            await self.api.patch_deployment(self.args.namespace, self.args.name, patch)
        except KubernetesError as exc:
            log.warning("rollback of %s failed: %s", self.where, exc, extra=log_ids(self.ctx))
            return RolloutOutcome(False, f"{outcome.message}. Rollback failed: {exc.message}")
        log.info("rolled back Deployment %s", self.where, extra=log_ids(self.ctx))
        await self._note(f"Rolled back Deployment {self.where} to the previous pod template")
        return RolloutOutcome(
            False,
            f"{outcome.message}. Rolled back to the previous pod template"
            " (its rollout was not awaited).",
            outcome.retryable,
        )


class KubernetesDeploymentAction:
    """Updates a Deployment and waits for its rollout (see the module docstring)."""

    name = "kubernetes_deployment"
    uses_callback = False

    def __init__(
        self,
        settings: Settings,
        api_client_factory: ApiClientFactory,
        options: DeploymentActionOptions | None = None,
    ) -> None:
        self.settings = settings
        self.api_client_factory = api_client_factory
        self.options = options or DeploymentActionOptions()

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        args = checked_deployment_arguments(ctx, self.settings)
        if isinstance(args, AttemptResult):
            return args
        try:
            api = KubeApi(
                await self.api_client_factory(),
                request_timeout_s=self.options.request_timeout_s,
                watch_timeout_s=self.options.watch_timeout_s,
            )
            async with api:
                outcome = await _Rollout(api, ctx, args, self.options).run()
        except KubernetesError as exc:
            log.warning(
                "update of Deployment %s/%s failed: %s",
                args.namespace,
                args.name,
                exc,
                extra=log_ids(ctx),
            )
            return AttemptResult.failure(
                exc.message, retryable=exc.retryable, response_status=exc.status
            )
        return outcome.to_result()

    async def cancel(self, ctx: AttemptContext) -> None:
        """Leave the Deployment as it is: a half-done rollout continues in the cluster."""
        log.info("deployment attempt cancelled; nothing to clean up", extra=log_ids(ctx))
