"""Approvals of untrusted pull requests by `/ok-to-test`, stored in the `approvals` table.

A writer's `/ok-to-test` stores who approved which pull request and when. The
`ok-to-test` label stays the visible marker, but only the stored approval lets the
pull request run: a label that anyone else adds approves nothing. Removing the label
deletes the approval (see `ForkTrustPolicy.labels_removed`).

NOTE: GitLab may report a label removal in the same merge request update as new
commits. The intake then starts a run and does not report the removal, so the
approval stays stored. That push still waits, because the label is missing, but a
user who adds the label again later approves the merge request without `/ok-to-test`.
"""

from __future__ import annotations

from bot.store.db import Connection


async def record_approval(
    conn: Connection,
    *,
    forge: str,
    repository: str,
    pr_number: int,
    approved_by: str,
    comment_id: int,
) -> None:
    """Store an approval, replacing an older one of the same pull request."""
    await conn.execute(
        "INSERT INTO approvals (forge, repository, pr_number, approved_by, comment_id)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (forge, repository, pr_number) DO UPDATE SET"
        " approved_by = EXCLUDED.approved_by, comment_id = EXCLUDED.comment_id,"
        " approved_at = now()",
        forge,
        repository,
        pr_number,
        approved_by,
        comment_id,
    )


async def approver(conn: Connection, forge: str, repository: str, pr_number: int) -> str | None:
    """Return the login of the user who approved the pull request, or None."""
    login: str | None = await conn.fetchval(
        "SELECT approved_by FROM approvals WHERE forge = $1 AND repository = $2 AND pr_number = $3",
        forge,
        repository,
        pr_number,
    )
    return login


async def revoke_approval(conn: Connection, forge: str, repository: str, pr_number: int) -> bool:
    """Delete the pull request's approval; return whether there was one."""
    deleted = await conn.fetchval(
        "DELETE FROM approvals WHERE forge = $1 AND repository = $2 AND pr_number = $3 RETURNING 1",
        forge,
        repository,
        pr_number,
    )
    return deleted is not None
