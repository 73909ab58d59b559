"""The contract between the engine and a task action.

The engine claims an attempt, fills the placeholders in the task's arguments, and calls
`Action.execute` with an `AttemptContext`. The action returns an `AttemptResult`; the
engine records it, retries on a retryable failure, and advances the step. An action that
must wait for an outside callback may return `AttemptResult.park()`: the engine then
frees the worker slot and completes the attempt when the callback arrives or its
deadline passes.

Actions never write task or step state themselves. They may store progress in the
attempt's `data` (through `AttemptContext.save_data`), which survives a crash, and
append log text (through `AttemptContext.append_log`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Outcome = Literal["succeeded", "failed", "parked"]


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    message: str = ""
    # False for failures that another attempt cannot fix (a 4xx response, a bad manifest).
    retryable: bool = True
    # Lower bound on the wait before the next attempt (from Retry-After), in seconds.
    retry_after_s: float | None = None
    response_status: int | None = None
    response_excerpt: str | None = None

    @classmethod
    def success(cls, message: str = "", **kwargs: Any) -> AttemptResult:
        return cls("succeeded", message, **kwargs)

    @classmethod
    def failure(cls, message: str, *, retryable: bool = True, **kwargs: Any) -> AttemptResult:
        return cls("failed", message, retryable=retryable, **kwargs)

    @classmethod
    def park(cls, message: str = "waiting for the callback", **kwargs: Any) -> AttemptResult:
        return cls("parked", message, **kwargs)


@dataclass
class AttemptContext:
    """Everything an action receives about the attempt it runs."""

    run_id: int
    job_name: str
    step_name: str
    task_id: int
    task_name: str
    attempt_id: int
    attempt_number: int
    # Same for every attempt of one task in one run.
    idempotency_key: str
    # Arguments with every placeholder filled (secrets included: never log them).
    arguments: Mapping[str, Any]
    labels: Mapping[str, Any]
    timeout_s: float
    # Seconds left before the attempt's deadline when execute() was called.
    remaining_s: float
    # Set for actions that accept callbacks: the URL (holding a fresh single-use token)
    # and the raw token, for actions that pass it separately.
    callback_url: str | None
    callback_token: str | None
    # Progress data stored by an earlier execution of this same attempt (after a crash).
    data: dict[str, Any]
    # True when this attempt was recovered from an expired lease of another process.
    recovered: bool
    save_data: Callable[[dict[str, Any]], Awaitable[None]]
    append_log: Callable[[str, str], Awaitable[None]]  # (source, text); secrets are masked
    mask: Callable[[str], str]  # replaces secret values in a string
    extra: dict[str, Any] = field(default_factory=dict)
    # Set before a cancellation that hands the attempt to another process (a graceful
    # shutdown): the action must leave outside resources such as a Kubernetes Job in
    # place, so the next process re-attaches to them.
    handing_back: bool = False
    # False for runs of untrusted pull requests (forks, authors without write access):
    # actions must give them nothing of the server's configuration, secrets included.
    trusted: bool = True


class Action(Protocol):
    name: str
    # True when the action's requests carry a callback URL the target may call.
    uses_callback: bool

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        """Run one attempt. Cancellation (CancelledError) means the task was cancelled
        or timed out: clean up outside resources and re-raise."""
        ...

    async def cancel(self, ctx: AttemptContext) -> None:
        """Clean up after an attempt that was cancelled while no process ran it
        (for example a parked attempt, or one whose worker died)."""
        ...


def refuse_untrusted(ctx: AttemptContext, action: str, why: str) -> AttemptResult | None:
    """Return a non-retryable failure when `ctx` belongs to an untrusted run, else None."""
    if ctx.trusted:
        return None
    return AttemptResult.failure(
        f"{action} does not run for untrusted pull requests (from forks or by authors "
        f"without write access): {why}",
        retryable=False,
    )
