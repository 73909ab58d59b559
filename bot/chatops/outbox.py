"""Chat-ops writes to the forge that reporting has no function for: labels, one-off notices.

Both go through the outbox like every other forge write. Labels have their own outbox
kind, `chatops.label`, delivered by `LabelSink` (register it with `chatops_sinks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.forges.clients import ForgeClients
from bot.forges.errors import ForgeError
from bot.net.sinks import OutboxRow, Sink, SinkOutcome, SinkState
from bot.outbox.sender import enqueue
from bot.reporting import enqueue_reply
from bot.reporting.payloads import read
from bot.reporting.sinks import outcome_for_error
from bot.reporting.targets import GITHUB_REPLY, GITLAB_REPLY, Target
from bot.store.db import Connection

LABEL_KIND = "chatops.label"

# Serialises notices per pull request, so two deliveries at once post one notice.
_NOTICE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
_NOTICE_QUEUED = """
SELECT EXISTS (
    SELECT 1 FROM outbox
    WHERE kind = ANY($1::text[]) AND payload->>'repository' = $2
      AND payload->>'pr_number' = $3 AND strpos(payload->>'body', $4) > 0
)
"""


async def enqueue_label(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    label: str,
    source: Mapping[str, Any],
    requested_by: int,
) -> None:
    """Queue adding `label` to a pull request or merge request.

    `requested_by` is the id of the comment that asked for it. It makes each request
    a distinct payload, so the sender does not skip a label added again after someone
    removed it.
    """
    target = Target.of(forge, repository, source)
    payload = {
        **target.payload(),
        "pr_number": pr_number,
        "label": label,
        "requested_by": requested_by,
    }
    await enqueue(
        conn,
        kind=LABEL_KIND,
        ordering_key=target.ordering_key,
        sink_key=f"{target.forge}:label:{target.project}:{pr_number}:{label}",
        payload=payload,
    )


async def enqueue_notice_once(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    marker: str,
    body: str,
    source: Mapping[str, Any],
) -> bool:
    """Queue a reply containing `marker`, unless one was queued for this PR before.

    Returns whether it queued one. Holds a transaction-level advisory lock on the
    pull request until the caller's transaction ends.
    """
    key = f"kubeci:notice:{forge}:{repository}:{pr_number}:{marker}"
    await conn.execute(_NOTICE_LOCK, key)
    kinds = [GITHUB_REPLY, GITLAB_REPLY]
    if await conn.fetchval(_NOTICE_QUEUED, kinds, repository, str(pr_number), marker):
        return False
    await enqueue_reply(
        conn,
        forge=forge,
        repository=repository,
        pr_number=pr_number,
        body=f"{marker}\n{body}",
        source=source,
    )
    return True


class LabelSink:
    """The sink of `chatops.label` rows: adds a label to a pull request or merge request."""

    def __init__(self, forges: ForgeClients) -> None:
        self._forges = forges

    async def send(self, row: OutboxRow, state: SinkState | None) -> SinkOutcome:
        try:
            return await self._send(row)
        except (ForgeError, ValueError) as error:
            # ValueError: a malformed row, or missing forge settings (ConfigError). The
            # sender logs the outcome.
            return outcome_for_error(error, row)

    async def _send(self, row: OutboxRow) -> SinkOutcome:
        target = Target.from_payload(row.payload)
        pr_number = read(row.payload, "pr_number", int)
        label = read(row.payload, "label", str)
        if target.forge == "github":
            client = self._forges.github()
            if target.installation_id is not None:
                client.remember_installation(target.repository, target.installation_id)
            await client.add_label(target.repository, pr_number, label)
        else:
            await self._forges.gitlab().add_label(target.project, pr_number, label)
        return SinkOutcome.sent(f"label {label} added to {target.repository} {pr_number}")


def chatops_sinks(forges: ForgeClients) -> dict[str, Sink]:
    """Return the chat-ops sinks by outbox kind, for `OutboxSender`."""
    return {LABEL_KIND: LabelSink(forges)}
