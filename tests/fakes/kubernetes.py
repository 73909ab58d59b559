"""A fake Kubernetes API server: a real aiohttp server on 127.0.0.1.

Tests reach it through kubernetes_asyncio itself (`FakeKubernetes.api_client` or a
kubeconfig from `write_kubeconfig`). It serves namespaced batch/v1 Jobs, core/v1 Pods
(with logs, followed or not) and apps/v1 Deployments. Lists and watches carry resource
versions and honour label and field selectors. Watches send ADDED, MODIFIED, DELETED,
BOOKMARK and 410 ERROR events. Errors come with the API's Status bodies. The fake
records every request.

Like the real control plane, creating a Job creates its pods (labelled `job-name` and
`controller-uid`), and a fake job controller sets the Job's conditions when its pods
end. Nothing else moves by itself: tests script pod and container states, logs, Job
conditions and Deployment rollouts, and inject error responses per verb and resource.

`make_attempt` builds the AttemptContext the engine would pass to an action, with
recording `save_data` and `append_log` callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client

from bot.actions.base import AttemptContext

# Orders fake API requests and recorded attempt log lines on one scale.
SEQUENCE = itertools.count(1)

SERVICE_ACCOUNT_USER = "system:serviceaccount:kubeci:kubeci"
_KINDS = {
    "pods": ("", "v1", "Pod"),
    "jobs": ("batch", "v1", "Job"),
    "deployments": ("apps", "v1", "Deployment"),
    "namespaces": ("", "v1", "Namespace"),
}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SMP_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RecordedRequest:
    """One request the fake received."""

    seq: int
    method: str
    path: str
    query: dict[str, str]
    verb: str
    group: str
    resource: str
    namespace: str
    name: str
    body: Any
    content_type: str
    authorization: str


@dataclass
class _Fault:
    verb: str
    resource: str
    status: int
    message: str | None
    times: int
    name: str | None


@dataclass
class _Event:
    rv: int
    resource: str
    namespace: str
    type: str
    obj: Obj


@dataclass
class _Log:
    data: bytearray = field(default_factory=bytearray)
    finished: bool = False


@dataclass(frozen=True)
class _Route:
    group: str
    version: str
    resource: str
    namespace: str
    name: str
    subresource: str

    @property
    def key(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def qualified(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource


class ApiAnswer(Exception):
    """An error response with a Status body, raised inside request handling."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def response(self) -> web.Response:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return web.json_response(body, status=self.code)

    def status_object(self) -> Obj:
        return json.loads(self.response().text or "{}")


def _parse_route(path: str) -> _Route | None:
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if rest[:1] != ["namespaces"]:
        return None
    if len(rest) <= 2:
        return _Route(group, version, "namespaces", "", rest[1] if len(rest) == 2 else "", "")
    namespace, resource = rest[1], rest[2]
    name = rest[3] if len(rest) > 3 else ""
    subresource = rest[4] if len(rest) > 4 else ""
    return _Route(group, version, resource, namespace, name, subresource)


def _flag(value: str | None) -> bool:
    """Parse a boolean query parameter as the API server does (Go's strconv.ParseBool)."""
    return (value or "").lower() in ("1", "t", "true")


def _verb(method: str, route: _Route, query: Mapping[str, str]) -> str:
    if method == "GET":
        if route.name:
            return "get"
        return "watch" if _flag(query.get("watch")) else "list"
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if route.name else "deletecollection",
    }.get(method, method.lower())


# --- Selectors and patches -----------------------------------------------------------


def _label_matches(labels: Mapping[str, str], selector: str) -> bool:
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_matches(obj: Obj, selector: str) -> bool:
    fields = {
        "metadata.name": obj["metadata"].get("name"),
        "metadata.namespace": obj["metadata"].get("namespace"),
        "status.phase": (obj.get("status") or {}).get("phase"),
    }
    for term in (t.strip() for t in selector.split(",") if t.strip()):
        key, _, value = term.replace("==", "=").partition("=")
        if fields.get(key) != value:
            return False
    return True


def _matches(obj: Obj, namespace: str, query: Mapping[str, str]) -> bool:
    if obj["metadata"].get("namespace") != namespace:
        return False
    labels = obj["metadata"].get("labels") or {}
    return _label_matches(labels, query.get("labelSelector", "")) and _field_matches(
        obj, query.get("fieldSelector", "")
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    """Apply a strategic merge patch, for the list merge keys of pod templates."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for name, value in patch.items():
            if name.startswith("$"):
                continue
            if value is None:
                result.pop(name, None)
            else:
                result[name] = strategic_merge_patch(result.get(name), value, name)
        return result
    if isinstance(patch, list) and key in _SMP_MERGE_KEYS and isinstance(target, list):
        return _merge_list(target, patch, _SMP_MERGE_KEYS[key])
    return copy.deepcopy(patch)


def _merge_list(target: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    result = copy.deepcopy(target)
    for item in patch:
        index = next(
            (i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(document: Any, operations: list[Obj]) -> Any:
    """Apply an RFC 6902 JSON patch (add, remove, replace, test); raise ValueError."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        container = document
        for part in parents:
            container = container[int(part)] if isinstance(container, list) else container[part]
        op = operation["op"]
        if op == "test":
            current = container[int(last)] if isinstance(container, list) else container.get(last)
            if current != operation["value"]:
                raise ValueError(f"test failed at {operation['path']}")
        elif op == "remove":
            del container[int(last) if isinstance(container, list) else last]
        elif op in ("add", "replace"):
            value = copy.deepcopy(operation["value"])
            if isinstance(container, list):
                if last == "-":
                    container.append(value)
                elif op == "add":
                    container.insert(int(last), value)
                else:
                    container[int(last)] = value
            else:
                if op == "replace" and last not in container:
                    raise ValueError(f"replace of a missing path {operation['path']}")
                container[last] = value
        else:
            raise ValueError(f"unsupported JSON patch operation {op!r}")
    return document


# --- The server ----------------------------------------------------------------------


class FakeKubernetes:
    """The fake API server; see the module docstring."""

    def __init__(self, namespaces: Iterable[str] = ("default",)) -> None:
        self.namespaces = set(namespaces)
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {
            "jobs": {},
            "pods": {},
            "deployments": {},
        }
        self.requests: list[RecordedRequest] = []
        # When True, a Job's conditions follow its pods like the real job controller.
        self.job_controller = True
        # When True, a Deployment patch finishes its rollout at once.
        self.auto_rollout = False
        self.url = ""
        self._rv = 1000
        self._oldest_rv = 0
        self._history: list[_Event] = []
        self._changed = asyncio.Event()
        self._faults: list[_Fault] = []
        self._logs: dict[tuple[str, str, str], _Log] = {}
        self._watch_expiries: dict[str, int] = {}
        self._bookmark_round = 0
        self._closing = False
        self._runner: web.AppRunner | None = None

    # Lifecycle

    async def __aenter__(self) -> FakeKubernetes:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        # Open watches and log streams end at once instead of holding up the shutdown.
        self._closing = True
        for log in self._logs.values():
            log.finished = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    def configuration(self) -> client.Configuration:
        configuration = client.Configuration()
        configuration.host = self.url
        return configuration

    async def api_client(self) -> client.ApiClient:
        """Create an ApiClient aimed at the fake (an ApiClientFactory)."""
        return client.ApiClient(self.configuration())

    def write_kubeconfig(self, path: Path, *, token: str = "fake-token") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    # Test helpers

    def requests_for(self, verb: str, resource: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.verb == verb and r.resource == resource]

    async def wait_until(self, predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
        """Wait until `predicate()` is truthy, checking after each change and every 20 ms.

        The timer catches conditions outside the fake, such as lines an action logged.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                changed = self._changed
                value = predicate()
                if value:
                    return value
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.02)

    def inject_error(
        self,
        verb: str,
        resource: str,
        status: int,
        *,
        message: str | None = None,
        times: int = 1,
        name: str | None = None,
    ) -> None:
        """Fail the next `times` requests of verb on resource ("pods/log" too) with `status`."""
        self._faults.append(_Fault(verb, resource, status, message, times, name))

    def expire_watches(self, resource: str) -> None:
        """End open watches of `resource` with a 410 ERROR event and forget old versions."""
        self._rv += 1
        self._oldest_rv = self._rv
        self._watch_expiries[resource] = self._watch_expiries.get(resource, 0) + 1
        self._notify()

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK event on every open watch that allows bookmarks."""
        self._bookmark_round += 1
        self._notify()

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        return self.objects[resource][(namespace, name)]

    def job_pods(self, namespace: str, job: str) -> list[str]:
        return sorted(
            name
            for (ns, name), pod in self.objects["pods"].items()
            if ns == namespace and pod["metadata"]["labels"].get("job-name") == job
        )

    # Internals: changes and events

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, resource: str, kind: str, obj: Obj) -> None:
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            self.objects[resource].pop(key, None)
        else:
            self.objects[resource][key] = obj
        self._history.append(_Event(rv, resource, key[0], kind, copy.deepcopy(obj)))
        self._notify()

    def _new_metadata(self, namespace: str, name: str, labels: Mapping[str, str]) -> Obj:
        return {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _now(),
            "generation": 1,
            "labels": dict(labels),
        }

    # Request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = _parse_route(request.path)
        query = dict(request.query)
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        if route is None:
            return ApiAnswer(
                404, "NotFound", "the server could not find the requested resource"
            ).response()
        verb = _verb(request.method, route, query)
        self.requests.append(
            RecordedRequest(
                next(SEQUENCE),
                request.method,
                request.path,
                query,
                verb,
                route.group,
                route.key,
                route.namespace,
                route.name,
                body,
                request.content_type,
                request.headers.get("Authorization", ""),
            )
        )
        self._notify()
        try:
            self._check_fault(verb, route)
            if route.namespace and route.namespace not in self.namespaces:
                raise ApiAnswer(
                    404,
                    "NotFound",
                    f'namespaces "{route.namespace}" not found',
                    {"name": route.namespace, "kind": "namespaces"},
                )
            handler = getattr(self, f"_{route.key.replace('/', '_')}_{verb}", None)
            if handler is None:
                raise ApiAnswer(405, "MethodNotAllowed", f"{verb} on {route.key} is not served")
            return await handler(request, route, query, body)
        except ApiAnswer as answer:
            return answer.response()

    def _check_fault(self, verb: str, route: _Route) -> None:
        for fault in self._faults:
            if fault.times <= 0 or fault.verb != verb or fault.resource != route.key:
                continue
            if fault.name is not None and fault.name != route.name:
                continue
            fault.times -= 1
            raise self._fault_answer(fault, route)

    def _fault_answer(self, fault: _Fault, route: _Route) -> ApiAnswer:
        name = route.name
        details = {"name": name, "group": route.group, "kind": route.resource}
        if fault.status == 403:
            message = fault.message or (
                f'{route.qualified} "{name}" is forbidden: User "{SERVICE_ACCOUNT_USER}" cannot '
                f'{fault.verb} resource "{route.key}" in API group "{route.group}" in the '
                f'namespace "{route.namespace}"'
            )
            return ApiAnswer(403, "Forbidden", message, details)
        if fault.status == 404:
            return ApiAnswer(
                404, "NotFound", fault.message or f'{route.qualified} "{name}" not found', details
            )
        if fault.status == 409:
            message = fault.message or f'{route.qualified} "{name}" already exists'
            return ApiAnswer(409, "AlreadyExists", message, details)
        if fault.status == 422:
            message = fault.message or f'{route.qualified} "{name}" is invalid'
            return ApiAnswer(422, "Invalid", message, {**details, "causes": [{"message": message}]})
        reasons = {
            401: "Unauthorized",
            410: "Expired",
            429: "TooManyRequests",
            500: "InternalError",
        }
        reason = reasons.get(fault.status, "Unknown")
        return ApiAnswer(fault.status, reason, fault.message or f"injected {fault.status}", details)

    def _find(self, route: _Route) -> Obj:
        obj = self.objects[route.resource].get((route.namespace, route.name))
        if obj is None:
            raise ApiAnswer(
                404,
                "NotFound",
                f'{route.qualified} "{route.name}" not found',
                {"name": route.name, "group": route.group, "kind": route.resource},
            )
        return obj

    # Generic get, list and watch

    async def _get(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        return web.json_response(self._find(route))

    async def _list(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        group, version, kind = _KINDS[route.resource]
        items = [
            copy.deepcopy(obj)
            for obj in self.objects[route.resource].values()
            if _matches(obj, route.namespace, query)
        ]
        api_version = f"{group}/{version}" if group else version
        return web.json_response(
            {
                "kind": f"{kind}List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await _WatchStream(self, response, route, query).run()
        return response

    _jobs_get = _get
    _jobs_list = _list
    _jobs_watch = _watch
    _pods_get = _get
    _pods_list = _list
    _pods_watch = _watch
    _deployments_get = _get
    _deployments_list = _list
    _deployments_watch = _watch

    async def _namespaces_get(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        if route.name not in self.namespaces:
            raise ApiAnswer(
                404,
                "NotFound",
                f'namespaces "{route.name}" not found',
                {"name": route.name, "kind": "namespaces"},
            )
        return web.json_response(
            {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {"name": route.name},
                "status": {"phase": "Active"},
            }
        )

    # Jobs

    async def _jobs_create(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        job = self._validate_job(body, route.namespace)
        name = job["metadata"]["name"]
        if (route.namespace, name) in self.objects["jobs"]:
            raise ApiAnswer(
                409,
                "AlreadyExists",
                f'jobs.batch "{name}" already exists',
                {"name": name, "group": "batch", "kind": "jobs"},
            )
        metadata = {
            **job.get("metadata", {}),
            **self._new_metadata(route.namespace, name, job["metadata"].get("labels") or {}),
        }
        job["metadata"] = metadata
        uid = metadata["uid"]
        spec = job["spec"]
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        template_labels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
        template_labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "job-name": name,
            }
        )
        job["status"] = {}

        self._emit("jobs", "ADDED", job)
        created = copy.deepcopy(job)
        for _ in range(spec["parallelism"]):
            self._create_job_pod(job)
        job = copy.deepcopy(job)
        job["status"] = {"active": spec["parallelism"], "startTime": _now()}
        self._emit("jobs", "MODIFIED", job)
        return web.json_response(created, status=201)

    def _validate_job(self, body: Any, namespace: str) -> Obj:
        if not isinstance(body, dict) or body.get("kind") != "Job":
            raise ApiAnswer(400, "BadRequest", "the body is not a Job")
        job = copy.deepcopy(body)
        name = str(job.get("metadata", {}).get("name") or "")
        invalid = []
        if not _DNS_LABEL.fullmatch(name) or len(name) > 63:
            invalid.append(
                f'metadata.name: Invalid value: "{name}": must be a DNS-1123 label '
                "of at most 63 characters"
            )
        pod_spec = job.get("spec", {}).get("template", {}).get("spec", {})
        for index, container in enumerate(pod_spec.get("containers") or []):
            if not container.get("image"):
                invalid.append(f"spec.template.spec.containers[{index}].image: Required value")
        if not pod_spec.get("containers"):
            invalid.append("spec.template.spec.containers: Required value")
        if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
            invalid.append(
                "spec.template.spec.restartPolicy: Required value: "
                'valid values: "OnFailure", "Never"'
            )
        if invalid:
            raise ApiAnswer(
                422,
                "Invalid",
                f'Job.batch "{name}" is invalid: ' + ", ".join(invalid),
                {
                    "name": name,
                    "group": "batch",
                    "kind": "Job",
                    "causes": [{"message": m} for m in invalid],
                },
            )
        return job

    def _create_job_pod(self, job: Obj) -> Obj:
        template = job["spec"]["template"]
        suffix = uuid.uuid4().hex[:5]
        name = f"{job['metadata']['name']}-{suffix}"
        namespace = job["metadata"]["namespace"]
        pod_spec = copy.deepcopy(template["spec"])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **self._new_metadata(namespace, name, template["metadata"]["labels"]),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job["metadata"]["name"],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {
                "phase": "Pending",
                "initContainerStatuses": [
                    _container_status(c, {"waiting": {"reason": "PodInitializing"}})
                    for c in pod_spec.get("initContainers") or []
                ],
                "containerStatuses": [
                    _container_status(c, {"waiting": {"reason": "ContainerCreating"}})
                    for c in pod_spec.get("containers") or []
                ],
            },
        }
        if not pod["status"]["initContainerStatuses"]:
            del pod["status"]["initContainerStatuses"]
        self._emit("pods", "ADDED", pod)
        return pod

    async def _jobs_delete(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        job = copy.deepcopy(self._find(route))
        policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Orphan"
        self._emit("jobs", "DELETED", job)
        if policy in ("Background", "Foreground"):
            uid = job["metadata"]["uid"]
            for pod in list(self.objects["pods"].values()):
                owners = pod["metadata"].get("ownerReferences") or []
                if any(owner.get("uid") == uid for owner in owners):
                    self.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": route.name,
                    "group": "batch",
                    "kind": "jobs",
                    "uid": job["metadata"]["uid"],
                },
            }
        )

    # Pod logs

    async def _pods_log_get(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        pod = self._find(_Route("", "v1", "pods", route.namespace, route.name, ""))
        container = self._log_container(pod, query.get("container", ""))
        log = self._logs.get((route.namespace, route.name, container))
        if log is None:
            state = _state_of(pod, container)
            reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
            raise ApiAnswer(
                400,
                "BadRequest",
                f'container "{container}" in pod "{route.name}" is waiting to start: {reason}',
            )
        if not _flag(query.get("follow")):
            data = bytes(log.data)
            if query.get("limitBytes"):
                data = data[: int(query["limitBytes"])]
            return web.Response(body=data, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0
        try:
            while True:
                changed = self._changed
                if sent < len(log.data):
                    chunk = bytes(log.data[sent:])
                    sent += len(chunk)
                    await response.write(chunk)
                    continue
                if log.finished or (route.namespace, route.name) not in self.objects["pods"]:
                    break
                await changed.wait()
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    def _log_container(self, pod: Obj, container: str) -> str:
        names = [c["name"] for c in pod["spec"].get("containers") or []]
        init_names = [c["name"] for c in pod["spec"].get("initContainers") or []]
        name = pod["metadata"]["name"]
        if not container:
            if len(names) == 1:
                return names[0]
            raise ApiAnswer(
                400,
                "BadRequest",
                f"a container name must be specified for pod {name}, choose one of: "
                f"[{' '.join(names)}] or one of the init containers: [{' '.join(init_names)}]",
            )
        if container not in names + init_names:
            raise ApiAnswer(400, "BadRequest", f"container {container} is not valid for pod {name}")
        return container

    # Deployments

    async def _deployments_patch(
        self, request: web.Request, route: _Route, query: Obj, body: Any
    ) -> web.StreamResponse:
        current = self._find(route)
        content_type = request.content_type
        try:
            if content_type == "application/json-patch+json":
                patched = json_patch(current, body)
            elif content_type == "application/merge-patch+json":
                patched = merge_patch(current, body)
            elif content_type == "application/strategic-merge-patch+json":
                patched = strategic_merge_patch(current, body)
            else:
                raise ApiAnswer(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format: {content_type}",
                )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ApiAnswer(
                422,
                "Invalid",
                f"the server rejected our request due to an error in our request: {exc}",
            ) from exc
        self._validate_deployment(patched)
        if patched["spec"] != current["spec"]:
            patched["metadata"]["generation"] = current["metadata"]["generation"] + 1
        if patched != current:
            self._emit("deployments", "MODIFIED", patched)
            if self.auto_rollout:
                self.complete_rollout(route.namespace, route.name)
        return web.json_response(self._find(route))

    def _validate_deployment(self, deployment: Obj) -> None:
        name = deployment["metadata"]["name"]
        problems = []
        replicas = deployment["spec"].get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 0:
            problems.append(
                f"spec.replicas: Invalid value: {replicas!r}: must be greater than or equal to 0"
            )
        for index, container in enumerate(
            deployment["spec"]["template"]["spec"].get("containers") or []
        ):
            where = f"spec.template.spec.containers[{index}]"
            if not container.get("image"):
                problems.append(f"{where}.image: Required value")
            for env_index, env in enumerate(container.get("env") or []):
                if env.get("value") and env.get("valueFrom"):
                    problems.append(
                        f'{where}.env[{env_index}].valueFrom: Invalid value: "": may not be '
                        "specified when `value` is not empty"
                    )
        if problems:
            raise ApiAnswer(
                422,
                "Invalid",
                f'Deployment.apps "{name}" is invalid: ' + ", ".join(problems),
                {
                    "name": name,
                    "group": "apps",
                    "kind": "Deployment",
                    "causes": [{"message": p} for p in problems],
                },
            )

    # Scripting: pods and containers

    def _pod(self, namespace: str, pod: str) -> Obj:
        return copy.deepcopy(self.objects["pods"][(namespace, pod)])

    def set_container_state(
        self, namespace: str, pod: str, container: str, state: Obj, *, last_state: Obj | None = None
    ) -> None:
        """Set a container's state (init containers too) and recompute the pod's phase."""
        obj = self._pod(namespace, pod)
        for status in _statuses(obj):
            if status["name"] == container:
                status["state"] = copy.deepcopy(state)
                status["ready"] = "running" in state
                if last_state is not None:
                    status["lastState"] = copy.deepcopy(last_state)
                break
        else:
            raise KeyError(f"pod {pod} has no container {container}")
        key = (namespace, pod, container)
        if "running" in state or "terminated" in state:
            self._logs.setdefault(key, _Log())
        if "terminated" in state and key in self._logs:
            self._logs[key].finished = True
        obj["status"]["phase"] = _phase(obj)
        if obj["status"]["phase"] != "Pending":
            _set_condition(obj, {"type": "PodScheduled", "status": "True"})
        self._emit("pods", "MODIFIED", obj)
        self._run_job_controller(obj)

    def set_waiting(
        self, namespace: str, pod: str, container: str, reason: str, message: str = ""
    ) -> None:
        self.set_container_state(
            namespace, pod, container, {"waiting": {"reason": reason, "message": message}}
        )

    def set_running(self, namespace: str, pod: str, container: str) -> None:
        self.set_container_state(namespace, pod, container, {"running": {"startedAt": _now()}})

    def set_terminated(
        self,
        namespace: str,
        pod: str,
        container: str,
        exit_code: int = 0,
        reason: str | None = None,
    ) -> None:
        terminated = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "finishedAt": _now(),
        }
        self.set_container_state(namespace, pod, container, {"terminated": terminated})

    def set_unschedulable(self, namespace: str, pod: str, message: str) -> None:
        obj = self._pod(namespace, pod)
        _set_condition(
            obj,
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            },
        )
        self._emit("pods", "MODIFIED", obj)

    def write_log(self, namespace: str, pod: str, container: str, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self._logs.setdefault((namespace, pod, container), _Log()).data += data
        self._notify()

    def delete_pod(self, namespace: str, pod: str) -> None:
        obj = self._pod(namespace, pod)
        for (ns, name, _), log in self._logs.items():
            if (ns, name) == (namespace, pod):
                log.finished = True
        self._emit("pods", "DELETED", obj)

    def add_pod(
        self, namespace: str, name: str, labels: Mapping[str, str], containers: Iterable[str]
    ) -> Obj:
        """Add a pod outside any Job (for a Deployment's pods), its containers waiting."""
        specs = [{"name": c, "image": f"example.test/{c}:1"} for c in containers]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": self._new_metadata(namespace, name, labels),
            "spec": {"containers": specs},
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    _container_status(c, {"waiting": {"reason": "ContainerCreating"}})
                    for c in specs
                ],
            },
        }
        self._emit("pods", "ADDED", pod)
        return pod

    def run_job_pod(
        self, namespace: str, job: str, logs: Mapping[str, str] | None = None, exit_code: int = 0
    ) -> str:
        """Run the Job's first pod to its end: each container starts, logs, and exits."""
        pod = self.job_pods(namespace, job)[0]
        spec = self.objects["pods"][(namespace, pod)]["spec"]
        names = [c["name"] for c in spec.get("initContainers") or []]
        main = [c["name"] for c in spec.get("containers") or []]
        for container in names + main:
            self.set_running(namespace, pod, container)
            self.write_log(namespace, pod, container, (logs or {}).get(container, ""))
            code = exit_code if container in main else 0
            self.set_terminated(namespace, pod, container, code)
        return pod

    # Scripting: Jobs

    def set_job_condition(
        self, namespace: str, job: str, condition_type: str, reason: str = "", message: str = ""
    ) -> None:
        obj = copy.deepcopy(self.objects["jobs"][(namespace, job)])
        conditions = obj.setdefault("status", {}).setdefault("conditions", [])
        conditions.append(
            {
                "type": condition_type,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            }
        )
        self._emit("jobs", "MODIFIED", obj)

    def fail_job(
        self, namespace: str, job: str, reason: str, message: str, *, delete_pods: bool = True
    ) -> None:
        """Fail a Job the way the controller does (e.g. DeadlineExceeded): pods go away."""
        self.set_job_condition(namespace, job, "FailureTarget", reason, message)
        self.set_job_condition(namespace, job, "Failed", reason, message)
        if delete_pods:
            for pod in self.job_pods(namespace, job):
                self.delete_pod(namespace, pod)

    def _run_job_controller(self, pod: Obj) -> None:
        owners = [o for o in pod["metadata"].get("ownerReferences") or [] if o.get("kind") == "Job"]
        phase = pod["status"]["phase"]
        if not self.job_controller or not owners or phase not in ("Succeeded", "Failed"):
            return
        key = (pod["metadata"]["namespace"], owners[0]["name"])
        job = copy.deepcopy(self.objects["jobs"].get(key))
        if job is None or _job_finished(job):
            return
        status = job.setdefault("status", {})
        field_name = "succeeded" if phase == "Succeeded" else "failed"
        status[field_name] = status.get(field_name, 0) + 1
        status["active"] = max(0, status.get("active", 1) - 1)
        self._emit("jobs", "MODIFIED", job)
        if status.get("succeeded", 0) >= job["spec"].get("completions", 1):
            self.set_job_condition(key[0], key[1], "SuccessCriteriaMet", "CompletionsReached")
            self.set_job_condition(key[0], key[1], "Complete", "CompletionsReached")
        elif status.get("failed", 0) > job["spec"].get("backoffLimit", 6):
            message = "Job has reached the specified backoff limit"
            self.set_job_condition(key[0], key[1], "FailureTarget", "BackoffLimitExceeded", message)
            self.set_job_condition(key[0], key[1], "Failed", "BackoffLimitExceeded", message)
        elif phase == "Failed":
            self._create_job_pod(self.objects["jobs"][key])

    # Scripting: Deployments

    def add_deployment(
        self, namespace: str, name: str, containers: list[Obj], *, replicas: int = 1
    ) -> Obj:
        """Add a Deployment whose rollout is complete."""
        labels = {"app": name}
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self._new_metadata(namespace, name, labels),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "progressDeadlineSeconds": 600,
                "strategy": {"type": "RollingUpdate"},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": copy.deepcopy(containers)},
                },
            },
            "status": {},
        }
        self.objects["deployments"][(namespace, name)] = deployment
        self.complete_rollout(namespace, name)
        return deployment

    def set_rollout(self, namespace: str, name: str, **status: Any) -> None:
        """Set Deployment status fields (observedGeneration, replicas, updatedReplicas, ...)."""
        obj = copy.deepcopy(self.objects["deployments"][(namespace, name)])
        obj["status"].update(status)
        self._emit("deployments", "MODIFIED", obj)

    def complete_rollout(self, namespace: str, name: str) -> None:
        obj = copy.deepcopy(self.objects["deployments"][(namespace, name)])
        replicas = obj["spec"].get("replicas", 1)
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        }
        self._emit("deployments", "MODIFIED", obj)

    def fail_rollout(self, namespace: str, name: str, message: str) -> None:
        """Mark the rollout as past its progress deadline, as the controller does."""
        obj = copy.deepcopy(self.objects["deployments"][(namespace, name)])
        status = obj["status"]
        status["observedGeneration"] = obj["metadata"]["generation"]
        status["conditions"] = [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": message,
            },
        ]
        self._emit("deployments", "MODIFIED", obj)


class _WatchStream:
    """One watch request: replays events after resourceVersion, then streams new ones."""

    def __init__(
        self, fake: FakeKubernetes, response: web.StreamResponse, route: _Route, query: Obj
    ) -> None:
        self.fake = fake
        self.response = response
        self.route = route
        self.query = query
        self.bookmarks = _flag(query.get("allowWatchBookmarks"))
        self.timeout_s = float(query.get("timeoutSeconds") or 1800)

    async def _send(self, kind: str, obj: Obj) -> None:
        await self.response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    async def _bookmark(self) -> None:
        group, version, kind = _KINDS[self.route.resource]
        api_version = f"{group}/{version}" if group else version
        metadata = {"resourceVersion": str(self.fake._rv)}
        await self._send(
            "BOOKMARK", {"kind": kind, "apiVersion": api_version, "metadata": metadata}
        )

    async def _gone(self, version: int) -> None:
        answer = ApiAnswer(
            410, "Expired", f"too old resource version: {version} ({self.fake._oldest_rv})"
        )
        await self._send("ERROR", answer.status_object())

    async def _start(self) -> int | None:
        """Send the initial state; return the version to continue from, None after a 410."""
        fake = self.fake
        requested = self.query.get("resourceVersion", "")
        if requested and requested != "0":
            if int(requested) < fake._oldest_rv:
                await self._gone(int(requested))
                return None
            return int(requested)
        for obj in list(fake.objects[self.route.resource].values()):
            if _matches(obj, self.route.namespace, self.query):
                await self._send("ADDED", obj)
        return fake._rv

    async def _replay(self, since: int) -> int:
        """Send the matching events after `since`; return the last version seen."""
        for event in [e for e in self.fake._history if e.rv > since]:
            since = event.rv
            if event.resource == self.route.resource and _matches(
                event.obj, self.route.namespace, self.query
            ):
                await self._send(event.type, event.obj)
        return since

    async def run(self) -> None:
        fake, resource = self.fake, self.route.resource
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        expiry = fake._watch_expiries.get(resource, 0)
        bookmark_round = fake._bookmark_round
        since = await self._start()
        while since is not None:
            changed = fake._changed
            since = await self._replay(since)
            if fake._watch_expiries.get(resource, 0) != expiry:
                await self._gone(since)
                return
            if self.bookmarks and fake._bookmark_round != bookmark_round:
                bookmark_round = fake._bookmark_round
                await self._bookmark()
            remaining_s = deadline - asyncio.get_running_loop().time()
            if remaining_s <= 0 or fake._closing:
                if self.bookmarks:
                    await self._bookmark()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining_s):
                    await changed.wait()


def _container_status(container: Obj, state: Obj) -> Obj:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "started": False,
        "state": state,
        "lastState": {},
    }


def _statuses(pod: Obj) -> list[Obj]:
    status = pod["status"]
    return list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )


def _state_of(pod: Obj, container: str) -> Obj:
    for status in _statuses(pod):
        if status["name"] == container:
            return dict(status.get("state") or {})
    return {}


def _phase(pod: Obj) -> str:
    statuses = pod["status"].get("containerStatuses") or []
    init = pod["status"].get("initContainerStatuses") or []
    exits = [
        s["state"]["terminated"]["exitCode"] for s in init + statuses if "terminated" in s["state"]
    ]
    if any(code != 0 for code in exits) and pod["spec"].get("restartPolicy", "Always") == "Never":
        return "Failed"
    if statuses and all("terminated" in s["state"] for s in statuses):
        return "Succeeded" if all(code == 0 for code in exits) else "Failed"
    if any("running" in s["state"] for s in statuses):
        return "Running"
    return "Pending"


def _set_condition(obj: Obj, condition: Obj) -> None:
    conditions = [
        c for c in obj["status"].get("conditions") or [] if c["type"] != condition["type"]
    ]
    obj["status"]["conditions"] = [*conditions, {"lastTransitionTime": _now(), **condition}]


def _job_finished(job: Obj) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


# --- The engine's side of an attempt -------------------------------------------------


@dataclass
class AttemptRecorder:
    """Stands in for the engine's save_data and append_log, recording each call."""

    saved: list[Obj] = field(default_factory=list)
    logs: list[tuple[int, str, str]] = field(default_factory=list)

    async def save_data(self, data: dict[str, Any]) -> None:
        self.saved.append(copy.deepcopy(data))

    async def append_log(self, source: str, text: str) -> None:
        self.logs.append((next(SEQUENCE), source, text))

    def text(self, source: str | None = None) -> str:
        return "".join(text for _, name, text in self.logs if source is None or name == source)

    def sources(self) -> set[str]:
        return {name for _, name, _ in self.logs}


def make_attempt(
    arguments: Mapping[str, Any],
    recorder: AttemptRecorder,
    **overrides: Any,
) -> AttemptContext:
    """Build the AttemptContext the engine would pass, with test defaults."""
    values: dict[str, Any] = {
        "run_id": 7,
        "job_name": "build",
        "step_name": "test",
        "task_id": 21,
        "task_name": "Unit Tests",
        "attempt_id": 301,
        "attempt_number": 1,
        "idempotency_key": "run-7-task-21",
        "arguments": arguments,
        "labels": {"repository": "acme/web", "sha": "a" * 40, "ref": "refs/heads/main"},
        "timeout_s": 60.0,
        "remaining_s": 60.0,
        "callback_url": "http://127.0.0.1:8080/callbacks/tok-123",
        "callback_token": "tok-123",
        "data": {},
        "recovered": False,
        "save_data": recorder.save_data,
        "append_log": recorder.append_log,
        "mask": lambda text: text.replace("tok-123", "***"),
    }
    values.update(overrides)
    return AttemptContext(**values)
