"""Claims on comments, so that chat-ops acts on each comment once.

GitHub and GitLab send a comment once per webhook that covers the repository. With a
repository hook and an organisation (or group) hook, the same comment arrives twice
with different delivery ids. The first transaction to insert the comment's row in
`handled_comments` acts on it; any other finds the row and does nothing.
"""

from __future__ import annotations

from bot.intake.events import NewComment
from bot.store.db import Connection


async def claim_comment(conn: Connection, comment: NewComment, delivery_pk: int) -> bool:
    """Insert the comment's row; return False when another delivery claimed it first.

    A concurrent claim of the same comment waits here until the other transaction ends.
    """
    claimed = await conn.fetchval(
        "INSERT INTO handled_comments (forge, repository, comment_id, delivery_pk)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
        comment.forge,
        comment.repository,
        comment.comment_id,
        delivery_pk,
    )
    return claimed is not None


async def is_claimed(conn: Connection, comment: NewComment) -> bool:
    """Tell whether a delivery has acted on the comment already."""
    found = await conn.fetchval(
        "SELECT 1 FROM handled_comments WHERE forge = $1 AND repository = $2 AND comment_id = $3",
        comment.forge,
        comment.repository,
        comment.comment_id,
    )
    return found is not None
