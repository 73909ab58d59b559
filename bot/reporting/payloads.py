"""Shapes of the outbox payloads that reports write and the forge sinks read.

Every payload starts with the target's fields (`Target.payload()`). The sinks rebuild
the target with `Target.from_payload` and read the rest with the `read_*` helpers.
Those raise ValueError naming the field, so a malformed row goes dead with a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from bot.forges.models import StatusState
from bot.reporting.targets import TargetFields

CheckPhase = Literal["start", "complete"]
STATUS_STATES: frozenset[str] = frozenset(
    {"pending", "running", "success", "failure", "error", "canceled"}
)


class StatusPayload(TargetFields):
    sha: str
    context: str
    state: StatusState
    description: str
    target_url: str | None


class CheckRunPayload(TargetFields):
    sha: str
    name: str
    # start: create an in-progress check run. complete: finish the one created at the
    # start (its id is the sink key's remote id), or create a finished one.
    phase: CheckPhase
    details_url: str | None
    external_id: str
    conclusion: str | None
    title: str
    summary: str
    text: str | None


class SummaryPayload(TargetFields):
    pr_number: int
    # Base of run page links (`<base>/runs/<id>`); None uses the server's public URL.
    base_url: str | None


class ReplyPayload(TargetFields):
    pr_number: int
    body: str
    # A hidden HTML comment in the body, to find the reply if a retry follows a lost response.
    marker: str


class ReactionPayload(TargetFields):
    comment_id: int
    content: str
    # GitLab addresses a note through its merge request; GitHub does not need it.
    pr_number: int | None


K = TypeVar("K")


def read(payload: Mapping[str, Any], key: str, kind: type[K]) -> K:
    """Return `payload[key]` if it has type `kind`; raise ValueError otherwise."""
    value = payload.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"the outbox payload has no valid {key!r} (expected {kind.__name__})")
    return value


def read_optional(payload: Mapping[str, Any], key: str, kind: type[K]) -> K | None:
    """Return `payload[key]`, or None when it is absent or null."""
    if payload.get(key) is None:
        return None
    return read(payload, key, kind)


def read_status_state(payload: Mapping[str, Any]) -> StatusState:
    state = read(payload, "state", str)
    if state not in STATUS_STATES:
        raise ValueError(f"the outbox payload has an unknown status state {state!r}")
    checked: StatusState = state  # type: ignore[assignment]
    return checked
