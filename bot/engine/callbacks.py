"""Single-use callback tokens that let a webhook target or a pod complete its attempt.

A token contains 256 random bits and is stored only as its SHA-256. It is valid while its
attempt is running or parked and before its expiry. Completing the attempt, by any
means, uses up every token of that attempt.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from bot.actions.base import AttemptResult
from bot.engine.core import Engine
from bot.store.db import Connection
from bot.store.text import clean_text

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


async def issue_token(conn: Connection, attempt_id: int, expires_at: datetime) -> str:
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO callbacks (token_hash, attempt_id, expires_at) VALUES ($1, $2, $3)",
        hash_token(token),
        attempt_id,
        expires_at,
    )
    return token


class CallbackBodyError(ValueError):
    """The callback's body is not `{"status": "succeeded"|"failed", "message": ...}`."""


@dataclass(frozen=True)
class CallbackReport:
    succeeded: bool
    message: str


def parse_callback_body(body: Any) -> CallbackReport:
    if not isinstance(body, dict):
        raise CallbackBodyError(
            'the callback body must be a JSON object such as {"status": "succeeded"}'
        )
    status = body.get("status")
    if status not in ("succeeded", "failed"):
        raise CallbackBodyError(f'invalid callback status {status!r}; send "succeeded" or "failed"')
    message = body.get("message", "")
    if message is None:
        message = ""
    if not isinstance(message, str):
        raise CallbackBodyError("the callback's message must be a string")
    return CallbackReport(succeeded=status == "succeeded", message=message[:MAX_MESSAGE_CHARS])


async def complete_by_callback(
    engine: Engine,
    pool: asyncpg.Pool,
    token: str,
    report: CallbackReport,
    mask: Callable[[str], str],
) -> int | None:
    """Complete the attempt that `token` belongs to and return its id.

    Returns None, changing nothing, when the token is unknown, used or expired, or the
    attempt's deadline has passed. `mask` hides secret values in the caller's message.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT c.attempt_id FROM callbacks c JOIN attempts a ON a.id = c.attempt_id"
            " WHERE c.token_hash = $1 AND c.used_at IS NULL AND c.expires_at > now()"
            " AND a.state IN ('running', 'waiting') AND a.deadline_at > now()",
            hash_token(token),
        )
        if row is None:
            return None
        attempt_id = int(row["attempt_id"])
        message = clean_text(mask(report.message))
        if report.succeeded:
            result = AttemptResult.success(message or "the callback reported success")
        else:
            result = AttemptResult.failure(
                message or "the callback reported failure", retryable=True
            )
        done = await engine.complete_attempt(conn, attempt_id, result)
        if not done:
            return None
        log.info("attempt completed by callback", extra={"attempt_id": attempt_id})
        return attempt_id
