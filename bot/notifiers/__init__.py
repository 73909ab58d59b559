"""Notifiers: webhook and Slack messages about job, step and task events.

The engine calls `notifier_rows` in the transaction that emits an event and writes the
rows to the outbox. The sinks from `notifier_sinks` deliver them through the outbox
sender. A failing notifier stays in the outbox and never changes a run's outcome.
"""

from bot.notifiers.rows import NotifierEvent, NotifierPayload, RunRef, notifier_rows
from bot.notifiers.sinks import (
    SLACK_KIND,
    WEBHOOK_KIND,
    SlackNotifier,
    WebhookNotifier,
    notifier_sinks,
)
from bot.notifiers.templates import default_slack_text

__all__ = [
    "SLACK_KIND",
    "WEBHOOK_KIND",
    "NotifierEvent",
    "NotifierPayload",
    "RunRef",
    "SlackNotifier",
    "WebhookNotifier",
    "default_slack_text",
    "notifier_rows",
    "notifier_sinks",
]
