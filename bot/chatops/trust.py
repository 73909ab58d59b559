"""The trust policy: whether a trigger runs now, and with the server's secrets or not.

Pushes and tags are trusted. A pull request is trusted when its branch lives in the
repository itself and its author has write access there. Any other pull request (from
a fork, including a deleted one, or by an author without write access) runs only once
a user with write access approved it with `/ok-to-test`, and then without secrets.

`/ok-to-test` stores the approval in the database (`bot.chatops.approvals`) and adds
the `ok-to-test` label. A pull request runs only while both are there: the label alone
approves nothing, because users without write access may add labels (the GitHub triage
role, a GitLab Reporter). Removing the label deletes the approval, so the pushes that
follow wait again. Adding or removing the label starts or cancels nothing by itself;
the next push or `/ok-to-test` does.

Until a pull request is approved, its head commit gets a pending `kubeci/ok-to-test`
status saying what to do, and the pull request gets one comment saying the same.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from bot.chatops import replies
from bot.chatops.access import AccessChecker, ForgeUser
from bot.chatops.approvals import approver, revoke_approval
from bot.chatops.outbox import enqueue_notice_once
from bot.forges.clients import ForgeClients
from bot.intake.events import Trigger
from bot.intake.service import TrustDecision
from bot.reporting import enqueue_status
from bot.store.db import Connection

log = logging.getLogger(__name__)


async def untrusted_reason(checker: AccessChecker, trigger: Trigger) -> str | None:
    """Return why a pull request trigger is untrusted, or None when it is trusted.

    Forks are untrusted without a lookup. Otherwise the author's access is looked
    up through `checker`, which raises ForgeError when the forge fails.
    """
    if trigger.fork:
        return "the pull request comes from a fork"
    author = ForgeUser(
        forge=trigger.forge,
        repository=trigger.repository,
        login=trigger.author,
        user_id=trigger.author_id,
        project_id=trigger.project_id,
        installation_id=trigger.installation_id,
    )
    if await checker.may_write(author):
        return None
    return f"its author {trigger.author or 'unknown'} lacks write access"


class ForkTrustPolicy:
    """The trust policy of the webhook intake for forks and authors without write access."""

    def __init__(self, pool: asyncpg.Pool, forges: ForgeClients) -> None:
        self.pool = pool
        self.forges = forges

    async def decide(self, trigger: Trigger) -> TrustDecision:
        """Decide whether `trigger` runs now, and with secrets.

        Raises ForgeError when the author's access cannot be looked up. The intake then
        responds with 503 and stores nothing, so a redelivery can succeed.
        """
        if trigger.pr_number is None:
            return TrustDecision(run=True, trusted=True, reason="pushes and tags are trusted")
        untrusted_because = await untrusted_reason(AccessChecker(self.forges), trigger)
        if untrusted_because is None:
            return TrustDecision(
                run=True, trusted=True, reason="the author has write access to the repository"
            )
        approved_by = await self._approver(trigger)
        if approved_by is not None:
            reason = (
                f"{untrusted_because}, but {approved_by} approved it with /ok-to-test;"
                " it runs without secrets"
            )
            return TrustDecision(run=True, trusted=False, reason=reason)
        await self._ask_for_approval(trigger, untrusted_because)
        reason = f"{untrusted_because}: a user with write access must comment /ok-to-test"
        if replies.OK_TO_TEST_LABEL in trigger.pr_labels:
            reason += f" (the {replies.OK_TO_TEST_LABEL} label alone approves nothing)"
        return TrustDecision(run=False, trusted=False, reason=reason)

    async def _approver(self, trigger: Trigger) -> str | None:
        """Return who approved the pull request, when it carries the label and an approval."""
        assert trigger.pr_number is not None
        if replies.OK_TO_TEST_LABEL not in trigger.pr_labels:
            return None
        async with self.pool.acquire() as conn:
            return await approver(conn, trigger.forge, trigger.repository, trigger.pr_number)

    async def labels_removed(
        self,
        conn: Connection,
        *,
        forge: str,
        repository: str,
        pr_number: int,
        labels: tuple[str, ...],
    ) -> str | None:
        """Revoke the approval when the `ok-to-test` label was removed.

        Returns a note for the delivery's reason, or None when no approval was revoked.
        """
        if replies.OK_TO_TEST_LABEL not in labels:
            return None
        if not await revoke_approval(conn, forge, repository, pr_number):
            return None
        log.info(
            "approval of pull request #%d revoked: the %s label was removed",
            pr_number,
            replies.OK_TO_TEST_LABEL,
            extra={"forge": forge, "repository": repository},
        )
        return "the /ok-to-test approval is revoked"

    async def _ask_for_approval(self, trigger: Trigger, untrusted_because: str) -> None:
        assert trigger.pr_number is not None
        source: dict[str, Any] = {**trigger.source(), "pr_number": trigger.pr_number}
        async with self.pool.acquire() as conn, conn.transaction():
            await enqueue_status(
                conn,
                forge=trigger.forge,
                repository=trigger.repository,
                sha=trigger.sha,
                context=replies.OK_TO_TEST_CONTEXT,
                state="pending",
                description=replies.approval_status(untrusted_because),
                target_url=None,
                source=source,
            )
            await enqueue_notice_once(
                conn,
                forge=trigger.forge,
                repository=trigger.repository,
                pr_number=trigger.pr_number,
                marker=replies.APPROVAL_MARKER,
                body=replies.approval_notice(untrusted_because, trigger.repository),
                source=source,
            )
        log.info(
            "pull request #%d waits for /ok-to-test: %s",
            trigger.pr_number,
            untrusted_because,
            extra={"forge": trigger.forge, "repository": trigger.repository},
        )
