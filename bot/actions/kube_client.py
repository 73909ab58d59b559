"""Cluster access for the Kubernetes actions: configuration, errors, API calls and watches.

Every API call goes through `KubeApi`, which checks the call against
`REQUIRED_PERMISSIONS` (the table that deploy/role.yaml must grant), turns the API's
responses into plain dicts in the API's own JSON form, and raises a `KubernetesError`
subclass for every failure. kubernetes_asyncio supplies the configuration loaders, the
authenticated HTTP session and the typed endpoint methods. Its `ApiException` never
leaves this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from bot.config import ConfigError, Settings

log = logging.getLogger(__name__)

Backend = Literal["kubernetes", "local"]
ApiClientFactory = Callable[[], Awaitable[client.ApiClient]]
KubeObject = dict[str, Any]

SERVICE_ACCOUNT_TOKEN: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

# The verbs KubeCI uses, by (API group, resource). deploy/role.yaml grants exactly these,
# and tests/test_deploy_rbac.py fails when the two differ. `KubeApi` rejects any call
# whose verb and resource are missing here.
REQUIRED_PERMISSIONS: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    ("batch", "jobs"): frozenset({"create", "get", "list", "watch", "delete"}),
    ("", "pods"): frozenset({"list", "watch"}),
    ("", "pods/log"): frozenset({"get"}),
    ("apps", "deployments"): frozenset({"get", "list", "watch", "patch"}),
}

WatchedKind = Literal["jobs", "pods", "deployments"]
_KIND_GROUPS: Final[Mapping[str, str]] = {"jobs": "batch", "pods": "", "deployments": "apps"}


# --- Errors -------------------------------------------------------------------------


class KubernetesError(Exception):
    """A Kubernetes API call failed, or the cluster could not be reached or configured."""

    # False when another attempt cannot succeed without someone changing something.
    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = dict(headers or {})


class KubernetesConfigError(KubernetesError):
    """No usable cluster configuration (in-cluster or kubeconfig)."""

    retryable = False


class KubernetesUnavailable(KubernetesError):
    """The API server could not be reached, timed out, or returned 429 or 5xx."""


class KubernetesBadRequest(KubernetesError):
    """400: the request is malformed, or requested the log of a container not started."""

    retryable = False


class KubernetesUnauthorized(KubernetesError):
    """401: the credentials are missing or expired."""


class KubernetesForbidden(KubernetesError):
    """403: the service account lacks a verb on a resource."""

    retryable = False


class KubernetesNotFound(KubernetesError):
    """404: the namespace or the object does not exist."""

    retryable = False


class KubernetesConflict(KubernetesError):
    """409: the object already exists, or changed since it was read."""


class KubernetesGone(KubernetesError):
    """410: a watch requested a resource version the server no longer keeps."""


class KubernetesInvalid(KubernetesError):
    """422: the API server rejected the object as invalid."""

    retryable = False


_ERRORS_BY_STATUS: Final[Mapping[int, type[KubernetesError]]] = {
    400: KubernetesBadRequest,
    401: KubernetesUnauthorized,
    403: KubernetesForbidden,
    404: KubernetesNotFound,
    409: KubernetesConflict,
    410: KubernetesGone,
    422: KubernetesInvalid,
}


@dataclass(frozen=True)
class Call:
    """One API call, described for permission checks and error messages."""

    verb: str
    group: str
    resource: str
    namespace: str
    name: str = ""

    @property
    def qualified_resource(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource


def require_permission(call: Call) -> None:
    """Raise RuntimeError when `call` is missing from REQUIRED_PERMISSIONS.

    A failure here is a KubeCI bug: the code uses a verb that the shipped Role lacks.
    """
    verbs = REQUIRED_PERMISSIONS.get((call.group, call.resource), frozenset())
    if call.verb not in verbs:
        raise RuntimeError(
            f"KubeCI calls {call.verb} on {call.qualified_resource}, which REQUIRED_PERMISSIONS "
            "does not list; add it there and to deploy/role.yaml"
        )


def _status_body(raw: bytes | str | None) -> Any:
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except ValueError:
        return text[:2000]


def _api_message(body: Any, fallback: str) -> str:
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()
    return fallback


def _describe(status: int, call: Call, body: Any, reason: str) -> str:
    """Build the message of an error response, naming the fix where one is known."""
    message = _api_message(body, reason or "no message")
    details = body.get("details") if isinstance(body, dict) else None
    details = details if isinstance(details, dict) else {}
    kind = str(details.get("kind") or call.resource)
    group = str(details.get("group") if "group" in details else call.group)
    where = f"in namespace {call.namespace!r}" if call.namespace else "cluster-wide"
    if status == 403:
        return (
            f"Kubernetes denied {call.verb} on {call.qualified_resource} {where}: {message}. "
            f"Grant KubeCI's service account the verb {call.verb!r} on resource {kind!r} "
            f"(API group {group!r}), as deploy/role.yaml does."
        )
    if status == 404 and kind == "namespaces":
        return (
            f"namespace {call.namespace!r} not found: create it, or set the task's "
            "namespace argument (default: KUBECI_KUBE_NAMESPACE) to an existing one"
        )
    if status == 404:
        name = details.get("name") or call.name
        return f"{call.qualified_resource} {name!r} not found {where}: {message}"
    if status == 409:
        return f"conflict on {call.qualified_resource} {call.name!r} {where}: {message}"
    if status == 422:
        return f"Kubernetes rejected {call.qualified_resource} {call.name!r} as invalid: {message}"
    return (
        f"Kubernetes API returned {status} {reason} for {call.verb} "
        f"{call.qualified_resource} {where}: {message}"
    )


def error_from_response(
    status: int,
    call: Call,
    *,
    raw_body: bytes | str | None,
    reason: str = "",
    headers: Mapping[str, str] | None = None,
) -> KubernetesError:
    """Build the KubernetesError subclass for an error response with a Status body."""
    body = _status_body(raw_body)
    if status == 429 or status >= 500:
        error_type: type[KubernetesError] = KubernetesUnavailable
    else:
        error_type = _ERRORS_BY_STATUS.get(status, KubernetesError)
    message = _describe(status, call, body, reason)
    return error_type(message, status=status, reason=reason, body=body, headers=headers)


def wrap_api_exception(exc: ApiException, call: Call) -> KubernetesError:
    """Convert kubernetes_asyncio's ApiException (raised by watches and loaders)."""
    status = int(exc.status or 0)
    raw: bytes | str | None = exc.body if exc.body else None
    reason = str(exc.reason or "")
    if raw is None and ": " in reason:
        # Watch errors carry the Status as "Reason: message" only.
        reason, _, message = reason.partition(": ")
        raw = json.dumps({"kind": "Status", "reason": reason, "message": message})
    headers = dict(exc.headers) if exc.headers else None
    return error_from_response(status, call, raw_body=raw, reason=reason, headers=headers)


# --- Configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSource:
    """The origin of the cluster configuration: a service account or a kubeconfig file."""

    kind: Literal["in-cluster", "kubeconfig"]
    path: str
    context: str = ""

    def describe(self) -> str:
        if self.kind == "in-cluster":
            return f"in-cluster service account ({self.path})"
        context = f", context {self.context!r}" if self.context else ""
        return f"kubeconfig {self.path}{context}"


def find_cluster_source(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    token_path: Path = SERVICE_ACCOUNT_TOKEN,
) -> ClusterSource | None:
    """Locate the cluster configuration, or return None when there is none.

    Order: KUBECI_KUBECONFIG when set (an explicit choice wins, even inside a pod); the
    pod's service account; then $KUBECONFIG (its first entry) or ~/.kube/config.
    Raises ConfigError when KUBECI_KUBECONFIG names a file that does not exist.
    """
    env = os.environ if environ is None else environ
    if settings.kubeconfig:
        path = Path(settings.kubeconfig).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"KUBECI_KUBECONFIG={settings.kubeconfig!r} is not a file; point it at a "
                "kubeconfig, or unset it to use the in-cluster service account"
            )
        return ClusterSource("kubeconfig", str(path), settings.kube_context)
    if token_path.is_file() and env.get("KUBERNETES_SERVICE_HOST"):
        return ClusterSource("in-cluster", str(token_path))
    candidates = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates.append(str(Path(env.get("HOME") or Path.home()) / ".kube" / "config"))
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.is_file():
            return ClusterSource("kubeconfig", str(path), settings.kube_context)
    return None


def choose_backend(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    token_path: Path = SERVICE_ACCOUNT_TOKEN,
) -> Backend:
    """Pick the backend for the Kubernetes actions, and log which one and why.

    KUBECI_BACKEND decides when set; otherwise a cluster configuration selects
    "kubernetes" and its absence "local". Raises ConfigError for an unknown value.
    """
    chosen = settings.backend.strip().lower()
    if chosen in ("kubernetes", "local"):
        log.info("Kubernetes actions use the %s backend (set by KUBECI_BACKEND)", chosen)
        return "kubernetes" if chosen == "kubernetes" else "local"
    if chosen:
        raise ConfigError(
            f"KUBECI_BACKEND={settings.backend!r} is not a backend; set it to kubernetes or "
            "local, or leave it empty to choose by the presence of a cluster configuration"
        )
    source = find_cluster_source(settings, environ=environ, token_path=token_path)
    if source is None:
        log.info(
            "No cluster configuration found (no service account token at %s, no kubeconfig): "
            "Kubernetes actions use the local backend, which runs Job commands as local "
            "processes and records Deployment updates in a file",
            token_path,
        )
        return "local"
    log.info("Kubernetes actions use the kubernetes backend with %s", source.describe())
    return "kubernetes"


async def load_configuration(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    token_path: Path = SERVICE_ACCOUNT_TOKEN,
) -> client.Configuration:
    """Load the cluster configuration found by `find_cluster_source`.

    Raises KubernetesConfigError when there is none or it cannot be used.
    """
    try:
        source = find_cluster_source(settings, environ=environ, token_path=token_path)
    except ConfigError as exc:
        raise KubernetesConfigError(str(exc)) from exc
    if source is None:
        raise KubernetesConfigError(
            "no cluster configuration: run KubeCI in a pod with a service account, set "
            "KUBECI_KUBECONFIG, or set KUBECI_BACKEND=local"
        )
    configuration = client.Configuration()
    try:
        if source.kind == "in-cluster":
            load_incluster: Callable[..., None] = config.load_incluster_config
            load_incluster(
                client_configuration=configuration,
                token_filename=source.path,
                cert_filename=str(Path(source.path).with_name("ca.crt")),
                environ=dict(os.environ if environ is None else environ),
            )
        else:
            await config.load_kube_config(
                config_file=source.path,
                context=source.context or None,
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError) as exc:
        raise KubernetesConfigError(f"cannot load {source.describe()}: {exc}") from exc
    return configuration


def api_client_factory(settings: Settings) -> ApiClientFactory:
    """Return a factory of ApiClients for the configured cluster.

    The configuration is loaded again for each client, so rotated service account
    tokens and refreshed kubeconfig credentials are picked up.
    """

    async def create() -> client.ApiClient:
        return client.ApiClient(await load_configuration(settings))

    return create


# --- API calls -----------------------------------------------------------------------

JSON_PATCH: Final = "application/json-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"


class KubeApi:
    """The Kubernetes API calls KubeCI makes, returning plain dicts.

    Use it as an async context manager; it closes its ApiClient on exit.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        request_timeout_s: float = 30.0,
        watch_timeout_s: int = 300,
    ) -> None:
        self.api_client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.request_timeout_s = request_timeout_s
        self.watch_timeout_s = watch_timeout_s

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.api_client.close()

    async def _open(
        self, call: Call, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        """Send one request and return the raw response; raise KubernetesError on an error."""
        require_permission(call)
        kwargs.setdefault("_request_timeout", self.request_timeout_s)
        try:
            response: aiohttp.ClientResponse = await method(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise wrap_api_exception(exc, call) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesUnavailable(
                f"cannot reach the Kubernetes API for {call.verb} {call.qualified_resource}: "
                f"{exc!r}"
            ) from exc
        if response.status >= 400:
            async with response:
                raw = await response.read()
            raise error_from_response(
                response.status,
                call,
                raw_body=raw,
                reason=response.reason or "",
                headers=dict(response.headers),
            )
        return response

    async def request_json(
        self, call: Call, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> KubeObject:
        response = await self._open(call, method, *args, **kwargs)
        try:
            async with response:
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KubernetesUnavailable(
                f"reading the response to {call.verb} {call.qualified_resource} failed: {exc!r}"
            ) from exc
        return payload if isinstance(payload, dict) else {}

    # Jobs

    async def create_job(self, namespace: str, body: KubeObject) -> KubeObject:
        name = str(body.get("metadata", {}).get("name", ""))
        call = Call("create", "batch", "jobs", namespace, name)
        return await self.request_json(call, self.batch.create_namespaced_job, namespace, body)

    async def read_job(self, namespace: str, name: str) -> KubeObject:
        call = Call("get", "batch", "jobs", namespace, name)
        return await self.request_json(call, self.batch.read_namespaced_job, name, namespace)

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods (the API's default orphans them)."""
        call = Call("delete", "batch", "jobs", namespace, name)
        await self.request_json(
            call,
            self.batch.delete_namespaced_job,
            name,
            namespace,
            propagation_policy="Background",
        )

    # Pods

    async def list_pods(self, namespace: str, label_selector: str) -> list[KubeObject]:
        call = Call("list", "", "pods", namespace)
        listing = await self.request_json(
            call, self.core.list_namespaced_pod, namespace, label_selector=label_selector
        )
        return list(listing.get("items") or [])

    async def read_pod_log(
        self, namespace: str, pod: str, container: str, *, limit_bytes: int
    ) -> bytes:
        """Read a container's log from its start, at most `limit_bytes` bytes of it."""
        call = Call("get", "", "pods/log", namespace, pod)
        response = await self._open(
            call,
            self.core.read_namespaced_pod_log,
            pod,
            namespace,
            container=container,
            limit_bytes=limit_bytes,
        )
        try:
            async with response:
                return await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesUnavailable(f"reading the log of {pod}/{container} failed") from exc

    async def follow_pod_log(
        self, namespace: str, pod: str, container: str
    ) -> AsyncGenerator[bytes, None]:
        """Yield a container's log as it is written, from its start, until it ends."""
        call = Call("get", "", "pods/log", namespace, pod)
        response = await self._open(
            call,
            self.core.read_namespaced_pod_log,
            pod,
            namespace,
            container=container,
            follow=True,
            _request_timeout=(self.request_timeout_s, None),
        )
        try:
            async with response:
                async for chunk in response.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesUnavailable(f"the log stream of {pod}/{container} broke") from exc

    # Deployments

    async def read_deployment(self, namespace: str, name: str) -> KubeObject:
        call = Call("get", "apps", "deployments", namespace, name)
        return await self.request_json(call, self.apps.read_namespaced_deployment, name, namespace)

    async def patch_deployment(
        self, namespace: str, name: str, patch: KubeObject | list[KubeObject]
    ) -> KubeObject:
        """Patch a Deployment: a dict is a strategic merge patch, a list a JSON patch."""
        call = Call("patch", "apps", "deployments", namespace, name)
        content_type = JSON_PATCH if isinstance(patch, list) else STRATEGIC_MERGE_PATCH
        return await self.request_json(
            call,
            self.apps.patch_namespaced_deployment,
            name,
            namespace,
            patch,
            _content_type=content_type,
        )

    # Watches

    def informer(
        self,
        kind: WatchedKind,
        namespace: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> Informer:
        return Informer(
            self, kind, namespace, label_selector=label_selector, field_selector=field_selector
        )

    def list_method(self, kind: WatchedKind) -> Callable[..., Awaitable[Any]]:
        if kind == "jobs":
            return self.batch.list_namespaced_job
        if kind == "pods":
            return self.core.list_namespaced_pod
        return self.apps.list_namespaced_deployment


class Informer:
    """A local copy of the objects matching a selector, kept current by a watch.

    `changes()` lists the objects, then watches from the list's resource version and
    yields after every change. When a watch ends at its server-side timeout, the next
    one resumes from the last resource version seen, bookmarks included. A 410 Gone
    response starts again from a fresh list. Nothing is polled.
    """

    MAX_WATCH_FAILURES: Final = 5

    def __init__(
        self,
        api: KubeApi,
        kind: WatchedKind,
        namespace: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> None:
        self.api = api
        self.kind = kind
        self.namespace = namespace
        self.objects: dict[str, KubeObject] = {}
        self.resource_version = ""
        self.lists = 0
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector

    def _call(self, verb: str) -> Call:
        return Call(verb, _KIND_GROUPS[self.kind], self.kind, self.namespace)

    async def changes(self) -> AsyncGenerator[None, None]:
        """Yield once after the first list, then after every change."""
        await self._relist()
        yield None
        failures = 0
        while True:
            try:
                async with aclosing(self._watch_once()) as events:
                    async for _ in events:
                        failures = 0
                        yield None
            except KubernetesGone:
                log.info("%s watch expired (410 Gone): listing again", self.kind)
                await self._relist()
                yield None
            except KubernetesUnavailable as exc:
                failures += 1
                if failures > self.MAX_WATCH_FAILURES:
                    raise
                log.warning("%s watch failed (%s); watching again", self.kind, exc)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))

    async def _relist(self) -> None:
        call = self._call("list")
        method = self.api.list_method(self.kind)
        listing = await self.api.request_json(call, method, self.namespace, **self._selectors)
        self.objects = {
            item["metadata"]["name"]: item
            for item in listing.get("items") or []
            if "metadata" in item
        }
        self.resource_version = str(listing.get("metadata", {}).get("resourceVersion", ""))
        self.lists += 1

    async def _watch_once(self) -> AsyncGenerator[None, None]:
        """Run one watch request and apply each event, until the server closes it."""
        call = self._call("watch")
        require_permission(call)
        stream = watch.Watch(return_type="object")
        timeout_s = self.api.watch_timeout_s
        try:
            async for event in stream.stream(
                self.api.list_method(self.kind),
                self.namespace,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=(self.api.request_timeout_s, timeout_s + 30),
                **self._selectors,
            ):
                if isinstance(event, dict) and self._apply(event):
                    yield None
        except ApiException as exc:
            raise wrap_api_exception(exc, call) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesUnavailable(f"the {self.kind} watch broke: {exc!r}") from exc
        finally:
            await stream.close()

    def _apply(self, event: Mapping[str, Any]) -> bool:
        """Apply a watch event; return False for events that change no object."""
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            return False
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if version:
            self.resource_version = str(version)
        kind = event.get("type")
        name = metadata.get("name")
        if kind == "BOOKMARK" or not name:
            return False
        if kind == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        return True
