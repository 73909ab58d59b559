"""Reports to GitHub and GitLab: commit statuses, check runs and pull request comments.

`Reporter.on_event` is an engine event hook that writes a run's reports as outbox rows
in the event's transaction. The `enqueue_*` functions do the same for webhook intake
and chat-ops. `forge_sinks` returns the outbox sinks that deliver the rows.
"""

from bot.reporting.enqueue import (
    TriggerLike,
    enqueue_config_error,
    enqueue_reaction,
    enqueue_reply,
    enqueue_status,
    enqueue_summary_refresh,
)
from bot.reporting.reporter import Reporter
from bot.reporting.sinks import forge_sinks
from bot.reporting.summary import MARKER as SUMMARY_MARKER

__all__ = [
    "SUMMARY_MARKER",
    "Reporter",
    "TriggerLike",
    "enqueue_config_error",
    "enqueue_reaction",
    "enqueue_reply",
    "enqueue_status",
    "enqueue_summary_refresh",
    "forge_sinks",
]
