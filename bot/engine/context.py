"""Building an action's `AttemptContext`: placeholders, secrets, callback tokens, logs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import asyncpg

from bot.actions.base import AttemptContext
from bot.engine.callbacks import issue_token
from bot.net.secrets import SecretNotFound
from bot.store.db import DB_ERRORS
from bot.store.text import clean_text
from pipelines_schema.placeholders import MissingValue, render

log = logging.getLogger(__name__)

# Stored log text per attempt is capped; past the cap one truncation marker is stored.
MAX_LOG_BYTES_PER_ATTEMPT = 4 * 1024 * 1024
# A callback token outlives its attempt's deadline by this much, for late but honest callers.
CALLBACK_GRACE_S = 60.0


class SecretSource(Protocol):
    def get(self, name: str) -> str: ...  # raises SecretNotFound

    def mask(self, text: str) -> str: ...


class PlaceholderError(Exception):
    """A placeholder cannot be filled for this run; the attempt fails without retry."""


@dataclass
class AttemptRow:
    """The claimed attempt joined with its task, step, job and run."""

    record: Mapping[str, Any]
    recovered: bool

    def __getitem__(self, key: str) -> Any:
        return self.record[key]


CLAIMED_ATTEMPT_SQL = """
SELECT a.id AS attempt_id, a.number, a.deadline_at, a.data,
       t.id AS task_id, t.name AS task_name, t.action, t.timeout_s, t.spec AS task_spec,
       t.idempotency_key, s.name AS step_name, j.name AS job_name,
       r.id AS run_id, r.labels, r.trusted, now() AS db_now
FROM attempts a
JOIN tasks t ON t.id = a.task_id
JOIN steps s ON s.id = t.step_id
JOIN jobs j ON j.id = s.job_id
JOIN runs r ON r.id = t.run_id
WHERE a.id = $1
"""


def label_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def make_resolver(
    row: AttemptRow, secrets: SecretSource, run_url: str, callback_url: str | None
) -> Any:
    labels: Mapping[str, Any] = row["labels"]

    def resolve(name: str) -> str:
        if name == "run.id":
            return str(row["run_id"])
        if name == "run.url":
            return run_url
        if name == "callback_url":
            if callback_url is None:
                raise PlaceholderError("${callback_url} is only available to async webhook tasks")
            return callback_url
        if name.startswith("secrets."):
            return _secret(name.removeprefix("secrets."), row, secrets)
        key = name.removeprefix("labels.")
        if key in labels and labels[key] is not None:
            return label_text(labels[key])
        raise MissingValue(name)

    return resolve


def _secret(name: str, row: AttemptRow, secrets: SecretSource) -> str:
    if not row["trusted"]:
        raise PlaceholderError(
            f"${{secrets.{name}}} is not available: runs of untrusted pull requests (from "
            "forks or by authors without write access) get no secrets, even after "
            "/ok-to-test; give the task a rule such as {label: fork, exact: 'false'}"
        )
    try:
        return secrets.get(name)
    except SecretNotFound as exc:
        raise PlaceholderError(str(exc)) from None


def render_arguments(
    row: AttemptRow, secrets: SecretSource, run_url: str, callback_url: str | None
) -> dict[str, Any]:
    """Fill every placeholder of the task's arguments; raise PlaceholderError if one fails."""
    resolve = make_resolver(row, secrets, run_url, callback_url)
    try:
        rendered = render(row["task_spec"].get("arguments", {}), resolve)
    except MissingValue as exc:
        raise PlaceholderError(
            f"label {exc.name!r} is not set for this run, so ${{{exc.name}}} cannot be "
            "filled; add a rule so the task runs only when it exists (for kubeci run, pass "
            f"--label {exc.name.removeprefix('labels.')}=VALUE)"
        ) from None
    assert isinstance(rendered, dict)
    return rendered


class LogWriter:
    """Append masked log text to an attempt, up to MAX_LOG_BYTES_PER_ATTEMPT."""

    def __init__(self, pool: asyncpg.Pool, attempt_id: int, secrets: SecretSource) -> None:
        self.pool = pool
        self.attempt_id = attempt_id
        self.secrets = secrets
        self.size_bytes = 0
        self.truncated = False

    async def append(self, source: str, text: str) -> None:
        if self.truncated or not text:
            return
        text = clean_text(self.secrets.mask(text))
        size = len(text.encode("utf-8", "replace"))
        truncated = self.size_bytes + size > MAX_LOG_BYTES_PER_ATTEMPT
        if truncated:
            room = max(0, MAX_LOG_BYTES_PER_ATTEMPT - self.size_bytes)
            text = text.encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
            text += f"\n[log truncated at {MAX_LOG_BYTES_PER_ATTEMPT} bytes]\n"
            self.truncated = True
        self.size_bytes += size
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO logs (attempt_id, source, content, truncated)"
                    " VALUES ($1, $2, $3, $4)",
                    self.attempt_id,
                    clean_text(source),
                    text,
                    truncated,
                )
        except DB_ERRORS as exc:
            # Logs are best effort: losing a line must not fail a task whose work succeeded.
            log.warning("storing a log line failed: %s", exc, extra={"attempt_id": self.attempt_id})


async def build_context(
    pool: asyncpg.Pool,
    row: AttemptRow,
    *,
    uses_callback: bool,
    secrets: SecretSource,
    callback_base_url: str,
    run_url: str,
    owner: str,
    extra: dict[str, Any],
) -> AttemptContext:
    """Return the AttemptContext for a claimed attempt (raises PlaceholderError)."""
    token = callback_url = None
    remaining_s = (row["deadline_at"] - row["db_now"]).total_seconds()
    if uses_callback:
        async with pool.acquire() as conn:
            token = await issue_token(
                conn,
                row["attempt_id"],
                row["deadline_at"] + timedelta(seconds=CALLBACK_GRACE_S),
            )
        callback_url = f"{callback_base_url}/callbacks/{token}"
    arguments = render_arguments(row, secrets, run_url, callback_url)
    writer = LogWriter(pool, row["attempt_id"], secrets)

    async def save_data(data: dict[str, Any]) -> None:
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE attempts SET data = $2 WHERE id = $1 AND lease_owner = $3",
                row["attempt_id"],
                data,
                owner,
            )

    return AttemptContext(
        run_id=row["run_id"],
        job_name=row["job_name"],
        step_name=row["step_name"],
        task_id=row["task_id"],
        task_name=row["task_name"],
        attempt_id=row["attempt_id"],
        attempt_number=row["number"],
        idempotency_key=row["idempotency_key"],
        arguments=arguments,
        labels=dict(row["labels"]),
        timeout_s=float(row["timeout_s"]),
        remaining_s=remaining_s,
        callback_url=callback_url,
        callback_token=token,
        data=dict(row["data"]),
        recovered=row.recovered,
        save_data=save_data,
        append_log=writer.append,
        mask=secrets.mask,
        extra={**extra, "run_url": run_url},
        trusted=bool(row["trusted"]),
    )
