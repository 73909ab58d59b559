"""Typed results of webhook parsing, shared by the GitHub and GitLab parsers.

A parser turns the raw request (body bytes and headers) into a `Delivery`, then
classifies it into an `Intent`: what the service should do about it. Neither step does
any I/O. Bad input raises `SignatureError` when authentication fails (respond with 401)
or `PayloadError` when the body is not what the forge documents (respond with 400).
"""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Forge = Literal["github", "gitlab"]
IntentKind = Literal["ping", "start", "cancel_ref", "cancel_pr", "comment", "ignore"]
TriggerEvent = Literal["push", "tag", "pull_request"]

# `before` of a ref-creating push and `after` of a ref-deleting push, on both forges.
ZERO_SHA = "0" * 40
# Maximum nesting of objects and arrays in a webhook body. Forge payloads nest a handful
# of levels, and much deeper documents overflow the recursion that cleans and stores them.
JSON_DEPTH_MAX = 100
# A Git commit id: 40 hexadecimal characters (SHA-1) or 64 (SHA-256 repositories).
_COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
# A segment of a GitHub `owner/name` or a GitLab `group/subgroup/project` path. Both
# forges allow ASCII letters, digits, '_', '-' and '.', and neither allows "." or "..".
_REPOSITORY_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
# NOTE: GitLab documents no limit for a full project path, nor Git for a ref name. These
# limits are KubeCI's: a run's superseding key (forge, repository, ref and job name) must
# fit a Postgres btree index entry, at most 2704 bytes.
REPOSITORY_MAX_CHARS = 512
REF_MAX_BYTES = 1024
# Maximum length of a delivery id header. The forges send UUIDs (36 characters), and the
# limit keeps the value well inside what the unique index on deliveries can store.
DELIVERY_ID_MAX_CHARS = 255


class WebhookError(Exception):
    """A webhook request that KubeCI rejects."""


class SignatureError(WebhookError):
    """The request's signature or token is missing or wrong."""


class PayloadError(WebhookError):
    """The request body or a header lacks a field, or a field has the wrong type.

    `field` is the path of the offending value, such as `pull_request.head.sha` or
    `header X-GitHub-Event`.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid webhook payload: {field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Delivery:
    """One webhook request, authenticated and decoded but not yet classified."""

    forge: Forge
    # X-GitHub-Delivery, GitLab's event UUID or idempotency key, or "sha256:<body hash>".
    delivery_id: str
    # X-GitHub-Event or X-Gitlab-Event, as sent.
    event_name: str
    action: str | None
    # GitHub `full_name` or GitLab `path_with_namespace`, when the payload names one.
    repository: str | None
    payload: Mapping[str, Any] = field(repr=False)
    # Where the hook is configured ("repository:123" on GitHub, the instance host on
    # GitLab). Only for logs.
    hook_target: str | None = None


@dataclass(frozen=True)
class Trigger:
    """A forge event that should start a pipeline run, with everything a run needs."""

    forge: Forge
    event: TriggerEvent
    repository: str
    # The exact commit to read `.kubeci.yml` at and to report statuses to.
    sha: str
    # Full ref: refs/heads/..., refs/tags/..., refs/pull/N/head or refs/merge-requests/N/head.
    ref: str
    branch: str | None = None
    tag: str | None = None
    pr_number: int | None = None
    source_branch: str | None = None
    target_branch: str | None = None
    pr_labels: tuple[str, ...] = ()
    # Login of the user who caused the event: the pusher, or the PR author on GitHub.
    # On GitLab merge requests this is the user who opened or updated the MR.
    author: str = ""
    # Forge user id of `author`. On GitLab merge requests it is the MR author's id.
    author_id: int | None = None
    fork: bool = False
    # Repository the head commit comes from (the fork for fork PRs). None when GitHub
    # reports the fork as deleted.
    head_repository: str | None = None
    head_project_id: int | None = None
    draft: bool = False
    before_sha: str | None = None
    installation_id: int | None = None
    project_id: int | None = None

    def labels(self) -> dict[str, str | list[str]]:
        """Build the run labels that pipeline rules and placeholders see.

        Pull requests carry no `branch` label: a fork's branch named `main` must not
        match a `branch: main` rule meant for pushes. Their branches are in
        `pr.source_branch` and `pr.target_branch`.
        """
        labels: dict[str, str | list[str]] = {
            "forge": self.forge,
            "event": self.event,
            "trigger": "webhook",
            "repository": self.repository,
            "sha": self.sha,
            "ref": self.ref,
            "author": self.author,
            "fork": "true" if self.fork else "false",
        }
        if self.branch is not None:
            labels["branch"] = self.branch
        if self.tag is not None:
            labels["tag"] = self.tag
        if self.pr_number is not None:
            labels["pr.number"] = str(self.pr_number)
            labels["pr.source_branch"] = self.source_branch or ""
            labels["pr.target_branch"] = self.target_branch or ""
            labels["pr.labels"] = list(self.pr_labels)
        return labels

    def source(self) -> dict[str, Any]:
        """Return the forge routing data a run keeps to report back (`runs.source`)."""
        routing: dict[str, Any] = {"forge": self.forge, "repository": self.repository}
        if self.installation_id is not None:
            routing["installation_id"] = self.installation_id
        if self.project_id is not None:
            routing["project_id"] = self.project_id
        if self.head_repository is not None:
            routing["head_repository"] = self.head_repository
        if self.head_project_id is not None:
            routing["head_project_id"] = self.head_project_id
        return routing


@dataclass(frozen=True)
class NewComment:
    """A comment just posted on a pull request or merge request."""

    forge: Forge
    repository: str
    # GitHub PR number or GitLab MR iid.
    pr_number: int
    comment_id: int
    author: str
    author_id: int | None
    author_is_bot: bool
    body: str
    # GitHub's author association (OWNER, MEMBER, COLLABORATOR, NONE...). None on GitLab.
    author_association: str | None = None
    # The MR's head commit. GitLab sends it but GitHub does not, so fetch the PR there.
    head_sha: str | None = None
    installation_id: int | None = None
    project_id: int | None = None


@dataclass(frozen=True)
class Intent:
    """The action the service should take for a delivery, with the reason.

    `start` carries `trigger`, `comment` carries `comment`, `cancel_ref` carries `ref`,
    `cancel_pr` carries `pr_number`. An `ignore` of a label change on a PR/MR also
    carries `pr_number` and the label names added or removed.
    """

    kind: IntentKind
    reason: str
    repository: str | None = None
    trigger: Trigger | None = None
    comment: NewComment | None = None
    ref: str | None = None
    pr_number: int | None = None
    labels_added: tuple[str, ...] = ()
    labels_removed: tuple[str, ...] = ()


_MISSING = object()


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    names.update({list: "array", dict: "object"})
    return names.get(type(value), type(value).__name__)


class Fields:
    """Read access to a decoded JSON object that checks types and tracks its path.

    Every failed read raises `PayloadError` naming the full path of the value, so no
    KeyError or TypeError escapes a parser.
    """

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self.data = data
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _value(self, key: str, expected: type, noun: str) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            raise PayloadError(self.where(key), "is missing")
        # bool is a subclass of int, but JSON true is never a valid integer field.
        wrong_bool = isinstance(value, bool) and expected is not bool
        if wrong_bool or not isinstance(value, expected):
            raise PayloadError(self.where(key), f"must be {noun}, got {_type_name(value)}")
        return value

    def _optional(self, key: str, expected: type, noun: str) -> Any:
        if self.data.get(key) is None:
            return None
        return self._value(key, expected, noun)

    def text(self, key: str) -> str:
        value: str = self._value(key, str, "a string")
        return value

    def commit_id(self, key: str) -> str:
        """Read a commit id; raise PayloadError unless it has 40 or 64 hex characters."""
        value = self.text(key)
        if not _COMMIT_ID.fullmatch(value):
            shown = value if len(value) <= 80 else value[:80] + "…"
            raise PayloadError(
                self.where(key),
                f"is {shown!r}; expected a commit id of 40 or 64 hexadecimal characters",
            )
        return value

    def optional_commit_id(self, key: str) -> str | None:
        """Read a commit id, or return None when the value is absent or null."""
        return None if self.data.get(key) is None else self.commit_id(key)

    def optional_text(self, key: str) -> str | None:
        value: str | None = self._optional(key, str, "a string")
        return value

    def integer(self, key: str) -> int:
        value: int = self._value(key, int, "an integer")
        return value

    def optional_integer(self, key: str) -> int | None:
        value: int | None = self._optional(key, int, "an integer")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """Read a boolean, or return `default` when the value is absent or null."""
        value: bool | None = self._optional(key, bool, "a boolean")
        return default if value is None else value

    def child(self, key: str) -> Fields:
        return Fields(self._value(key, dict, "an object"), self.where(key))

    def optional_child(self, key: str) -> Fields | None:
        value = self._optional(key, dict, "an object")
        return None if value is None else Fields(value, self.where(key))

    def child_list(self, key: str) -> list[Fields]:
        """Read an array of objects, or return [] when the value is absent or null."""
        items: list[Any] | None = self._optional(key, list, "an array")
        children = []
        for index, item in enumerate(items or []):
            where = f"{self.where(key)}[{index}]"
            if not isinstance(item, dict):
                raise PayloadError(where, f"must be an object, got {_type_name(item)}")
            children.append(Fields(item, where))
        return children


def check_repository_name(
    name: str, where: str, *, form: str, max_segments: int | None = None
) -> str:
    """Return `name` when it is a valid repository path; raise PayloadError otherwise.

    A valid path has at least two segments and at most `max_segments`, such as GitHub's
    `owner/name` or GitLab's `group/subgroup/project`. `form` names the expected shape
    in the error. Each segment may contain only ASCII letters, digits, '_', '-' and '.',
    and may not be "." or "..", so that no name changes the path of a forge API URL.
    """
    segments = name.split("/")
    too_many = max_segments is not None and len(segments) > max_segments
    if len(segments) < 2 or too_many:
        raise PayloadError(where, f"is {name!r}; expected the form {form}")
    if len(name) > REPOSITORY_MAX_CHARS:
        raise PayloadError(where, f"is {len(name)} characters long; at most {REPOSITORY_MAX_CHARS}")
    for segment in segments:
        if segment in (".", "..") or not _REPOSITORY_SEGMENT.fullmatch(segment):
            raise PayloadError(
                where,
                f"is {name!r}; each segment may contain only ASCII letters, digits, '_', '-'"
                " and '.', and may not be '.' or '..'",
            )
    return name


def check_ref(ref: str, where: str) -> str:
    """Return `ref`; raise PayloadError when its UTF-8 form is over `REF_MAX_BYTES`."""
    size_bytes = len(ref.encode("utf-8", "replace"))
    if size_bytes > REF_MAX_BYTES:
        raise PayloadError(
            where, f"is {size_bytes} bytes long; KubeCI accepts refs of at most {REF_MAX_BYTES}"
        )
    return ref


def normalise_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Return the headers with lower-case names, as HTTP header names are case-blind."""
    return {name.lower(): value for name, value in headers.items()}


def delivery_id_header(headers: Mapping[str, str], name: str) -> str:
    """Return the stripped value of delivery id header `name` ("" when absent).

    `headers` must have lower-case names. Raises PayloadError when the value is longer
    than `DELIVERY_ID_MAX_CHARS`, because the header is not covered by the signature
    and an id that long is no forge's.
    """
    value = headers.get(name.lower(), "").strip()
    if len(value) > DELIVERY_ID_MAX_CHARS:
        raise PayloadError(
            f"header {name}",
            f"is {len(value)} characters long; a delivery id may have at most "
            f"{DELIVERY_ID_MAX_CHARS}",
        )
    return value


class _UnreadableNumber(Exception):
    """A JSON number that KubeCI cannot store. The message names the number and the reason."""


def _reject_constant(name: str) -> float:
    # Python's json module accepts NaN, Infinity and -Infinity, which JSON does not
    # allow and Postgres jsonb rejects.
    raise _UnreadableNumber(f"contains {name}, which is not a valid JSON number")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise _UnreadableNumber(f"contains the number {shown}, which is out of range of a float")
    return value


def _parse_int(text: str) -> int:
    # Python refuses to convert integers longer than sys.get_int_max_str_digits()
    # (4300 by default, 0 for no limit) and raises a ValueError that names the setting.
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise _UnreadableNumber(f"contains an integer of {digits} digits; at most {limit} fit")
    return int(text)


def _nesting_depth_exceeds(document: Any, max_depth: int) -> bool:
    """Tell whether objects and arrays in `document` nest deeper than `max_depth` levels."""
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > max_depth:
            return True
        children = value.values() if isinstance(value, dict) else value
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def decode_json_object(raw: bytes | str, where: str = "body") -> dict[str, Any]:
    """Decode a JSON document whose top level must be an object.

    Raises PayloadError when `raw` is not UTF-8 JSON, its top level is not an object, or
    it nests deeper than `JSON_DEPTH_MAX`. Raises PayloadError too when it contains NaN,
    Infinity, a number out of range of a float (such as 1e400) or an integer too long
    for Python to convert.
    """
    try:
        document = json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_float=_parse_finite_float,
            parse_int=_parse_int,
        )
    except UnicodeDecodeError as exc:
        raise PayloadError(where, f"is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise PayloadError(where, f"is not valid JSON ({exc})") from exc
    except _UnreadableNumber as exc:
        raise PayloadError(where, str(exc)) from exc
    except RecursionError as exc:
        # The decoder recurses once per level of nesting.
        raise PayloadError(where, _too_deep()) from exc
    if not isinstance(document, dict):
        raise PayloadError(where, f"must be a JSON object, got {_type_name(document)}")
    if _nesting_depth_exceeds(document, JSON_DEPTH_MAX):
        raise PayloadError(where, _too_deep())
    return document


def _too_deep() -> str:
    return f"nests objects and arrays deeper than {JSON_DEPTH_MAX} levels"


def decode_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a webhook body sent as JSON or as a form with a `payload` field.

    A missing content type is read as JSON.
    """
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    if media_type == "application/json":
        return decode_json_object(body)
    if media_type != "application/x-www-form-urlencoded":
        raise PayloadError(
            "header Content-Type",
            f"is {media_type!r}; send application/json or application/x-www-form-urlencoded",
        )
    try:
        form = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise PayloadError("body", f"is not UTF-8 text ({exc.reason})") from exc
    values = form.get("payload")
    if not values:
        raise PayloadError("form field payload", "is missing")
    return decode_json_object(values[0], where="form field payload")


def ref_name(ref: str) -> tuple[Literal["branch", "tag"] | None, str]:
    """Split a full ref into its kind and short name, or return (None, ref) for other refs."""
    if ref.startswith("refs/heads/"):
        return "branch", ref.removeprefix("refs/heads/")
    if ref.startswith("refs/tags/"):
        return "tag", ref.removeprefix("refs/tags/")
    return None, ref
