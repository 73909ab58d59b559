"""Words for a job's outcome: status states, check run conclusions and descriptions."""

from __future__ import annotations

from bot.forges.models import StatusState
from bot.reporting.outcomes import JobOutcome
from bot.reporting.texts import format_duration, one_line, short_sha

_STATUS_STATES: dict[str, StatusState] = {
    "succeeded": "success",
    "failed": "failure",
    "cancelled": "canceled",
}
_CONCLUSIONS = {"succeeded": "success", "failed": "failure", "cancelled": "cancelled"}


def status_state(job_state: str) -> StatusState:
    """Return the final commit status of a job state; anything unexpected is `error`."""
    return _STATUS_STATES.get(job_state, "error")


def check_conclusion(job_state: str) -> str:
    """Return the check run conclusion of a final job state."""
    return _CONCLUSIONS.get(job_state, "neutral")


def job_description(outcome: JobOutcome) -> str:
    """Describe a finished job in one line: what failed and why, or why it was cancelled.

    The caller shortens the line to the forge's limit; the cause comes first so the cut
    takes the end of the message.
    """
    if outcome.state == "succeeded":
        duration = format_duration(outcome.started_at, outcome.finished_at)
        return f"succeeded in {duration}" if duration else "succeeded"
    if outcome.state == "cancelled":
        if outcome.superseded_by:
            return f"cancelled: superseded by {short_sha(outcome.superseded_by)}"
        return _with_reason("cancelled", outcome.message)
    if outcome.state == "failed":
        return _failure(outcome)
    return one_line(outcome.state)


def _failure(outcome: JobOutcome) -> str:
    if outcome.failed_tasks:
        task = outcome.failed_tasks[0]
        return _with_reason(f"failed in {task.step}/{task.task}", task.message)
    if outcome.failed_step is not None:
        return _with_reason(f"failed in step {outcome.failed_step}", outcome.failed_step_message)
    return _with_reason("failed", outcome.message)


def _with_reason(headline: str, reason: str) -> str:
    reason = one_line(reason)
    return f"{headline}: {reason}" if reason else headline
