"""Queries of a pull request's runs and jobs, for chat-ops."""

from __future__ import annotations

from bot.store.db import Connection

# Job states that `/retest` runs again.
RETEST_STATES = frozenset({"failed", "cancelled"})


async def latest_job_states(
    conn: Connection, forge: str, repository: str, pr_number: int, sha: str
) -> dict[str, str]:
    """Return the state of the newest job of each name that ran on `sha` for the PR."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (j.name) j.name, j.state FROM jobs j JOIN runs r ON r.id = j.run_id"
        " WHERE r.forge = $1 AND r.repository = $2 AND r.pr_number = $3 AND r.sha = $4"
        " ORDER BY j.name, j.id DESC",
        forge,
        repository,
        pr_number,
        sha,
    )
    return {row["name"]: row["state"] for row in rows}


async def active_run_ids(
    conn: Connection, forge: str, repository: str, pr_number: int
) -> list[int]:
    """Return the ids of the PR's runs that are still running, oldest first."""
    rows = await conn.fetch(
        "SELECT id FROM runs WHERE forge = $1 AND repository = $2 AND pr_number = $3"
        " AND state = 'running' ORDER BY id",
        forge,
        repository,
        pr_number,
    )
    return [int(row["id"]) for row in rows]


async def newest_webhook_sha(
    conn: Connection, forge: str, repository: str, pr_number: int
) -> str | None:
    """Return the commit of the PR's newest run that a webhook started, or None."""
    sha: str | None = await conn.fetchval(
        "SELECT sha FROM runs WHERE forge = $1 AND repository = $2 AND pr_number = $3"
        " AND labels->>'trigger' = 'webhook' ORDER BY id DESC LIMIT 1",
        forge,
        repository,
        pr_number,
    )
    return sha
