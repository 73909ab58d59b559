"""`GET /runs/{id}`: the run page that commit statuses link to.

The page is rendered on the server from the database: the trigger, every job, step and
task with its state and duration, each attempt's message, and the end of its log.
`GET /runs/{id}.json` returns the same data as JSON. Each attempt's `log` contains at most
the last `MAX_PAGE_LOG_CHARS` characters, and `log_total_chars` is the full length.
"""

from __future__ import annotations

import html
import json
import logging
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

log = logging.getLogger(__name__)

# Log text shown per attempt on the page; the rest is cut with a marker.
MAX_PAGE_LOG_CHARS = 200_000

# The fewest newest log rows of each attempt that contain at least `$2` characters (all
# rows of a shorter log), in the order they were written, with the attempt's total log
# length. Only these rows leave the database, however long the log is.
_LOG_TAIL_QUERY = """
SELECT attempt_id, content, total_chars FROM (
    SELECT l.id, l.attempt_id, l.content,
           sum(char_length(l.content)) OVER (
               PARTITION BY l.attempt_id ORDER BY l.id DESC
           ) AS chars_from_end,
           sum(char_length(l.content)) OVER (PARTITION BY l.attempt_id) AS total_chars
    FROM logs l
    JOIN attempts a ON a.id = l.attempt_id
    JOIN tasks t ON t.id = a.task_id
    WHERE t.run_id = $1
) newest
WHERE chars_from_end - char_length(content) < $2
ORDER BY id
"""

STATE_COLOURS = {
    "succeeded": "#1a7f37",
    "failed": "#cf222e",
    "cancelled": "#6e7781",
    "skipped": "#8c959f",
    "running": "#9a6700",
    "pending": "#9a6700",
    "queued": "#9a6700",
    "waiting": "#9a6700",
}

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.state { font-weight: 600; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; max-height: 30em; }
"""


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return ""
    if end is None:
        return "running"
    return f"{(end - start).total_seconds():.1f} s"


def _state(state: str) -> str:
    colour = STATE_COLOURS.get(state, "#1f2328")
    return f'<span class="state" style="color:{colour}">{html.escape(state)}</span>'


async def load_run(pool: asyncpg.Pool, run_id: int) -> dict[str, Any] | None:
    """Return the run with its jobs, steps, tasks, attempts and log tails, or None."""
    async with pool.acquire() as conn:
        run = await conn.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
        if run is None:
            return None
        jobs = await conn.fetch("SELECT * FROM jobs WHERE run_id = $1 ORDER BY position", run_id)
        steps = await conn.fetch(
            "SELECT s.* FROM steps s JOIN jobs j ON j.id = s.job_id WHERE j.run_id = $1"
            " ORDER BY s.position",
            run_id,
        )
        tasks = await conn.fetch("SELECT * FROM tasks WHERE run_id = $1 ORDER BY position", run_id)
        attempts = await conn.fetch(
            "SELECT a.* FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = $1"
            " ORDER BY a.number",
            run_id,
        )
        logs = await conn.fetch(_LOG_TAIL_QUERY, run_id, MAX_PAGE_LOG_CHARS)
    return _assemble(run, jobs, steps, tasks, attempts, logs)


def _log_tails(logs: list[asyncpg.Record]) -> dict[int, tuple[str, int]]:
    """Map each attempt id to the last characters of its log and the log's full length."""
    parts: dict[int, list[str]] = {}
    totals: dict[int, int] = {}
    for row in logs:
        parts.setdefault(row["attempt_id"], []).append(row["content"])
        totals[row["attempt_id"]] = int(row["total_chars"])
    return {
        attempt_id: ("".join(texts)[-MAX_PAGE_LOG_CHARS:], totals[attempt_id])
        for attempt_id, texts in parts.items()
    }


def _assemble(
    run: asyncpg.Record,
    jobs: list[asyncpg.Record],
    steps: list[asyncpg.Record],
    tasks: list[asyncpg.Record],
    attempts: list[asyncpg.Record],
    logs: list[asyncpg.Record],
) -> dict[str, Any]:
    log_tails = _log_tails(logs)
    attempts_by_task: dict[int, list[dict[str, Any]]] = {}
    for row in attempts:
        text, total_chars = log_tails.get(row["id"], ("", 0))
        item = {**_public(row), "log": text, "log_total_chars": total_chars}
        attempts_by_task.setdefault(row["task_id"], []).append(item)
    tasks_by_step: dict[int, list[dict[str, Any]]] = {}
    for row in tasks:
        item = {**_public(row), "attempt_list": attempts_by_task.get(row["id"], [])}
        tasks_by_step.setdefault(row["step_id"], []).append(item)
    steps_by_job: dict[int, list[dict[str, Any]]] = {}
    for row in steps:
        item = {**_public(row), "tasks": tasks_by_step.get(row["id"], [])}
        steps_by_job.setdefault(row["job_id"], []).append(item)
    job_list = [{**_public(row), "steps": steps_by_job.get(row["id"], [])} for row in jobs]
    return {**_public(run), "jobs": job_list}


# Columns never shown: internal bookkeeping, and the task templates (which may name secrets).
HIDDEN_COLUMNS = {"spec", "pipeline", "source", "lease_owner", "lease_expires_at", "data"}


def _public(row: asyncpg.Record) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in HIDDEN_COLUMNS}


def render_run(run: dict[str, Any]) -> str:
    title = f"KubeCI run {run['id']}: {run['state']}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{PAGE_STYLE}</style></head><body>",
        f"<h1>Run {run['id']} {_state(run['state'])}</h1>",
        _trigger_table(run),
    ]
    for job in run["jobs"]:
        parts.append(_job_section(job))
    parts.append("</body></html>")
    return "\n".join(parts)


def _trigger_table(run: dict[str, Any]) -> str:
    rows = [
        ("forge", run["forge"]),
        ("repository", run["repository"]),
        ("ref", run["ref"]),
        ("commit", run["sha"]),
        ("pull request", run["pr_number"] if run["pr_number"] is not None else ""),
        ("duration", _duration(run["started_at"], run["finished_at"])),
        ("message", run["message"]),
    ]
    labels = ", ".join(f"{key}={value}" for key, value in sorted(run["labels"].items()))
    rows.append(("labels", labels))
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"
        for name, value in rows
        if value not in ("", None)
    )
    return f"<table>{body}</table>"


def _job_section(job: dict[str, Any]) -> str:
    parts = [
        f"<h2>Job {html.escape(job['name'])} {_state(job['state'])}"
        f" <small>{_duration(job['started_at'], job['finished_at'])}</small></h2>"
    ]
    if job["message"]:
        parts.append(f"<p>{html.escape(job['message'])}</p>")
    for step in job["steps"]:
        parts.append(
            f"<h3>Step {html.escape(step['name'])} {_state(step['state'])}"
            f" <small>{_duration(step['started_at'], step['finished_at'])}</small></h3>"
        )
        parts.append(_task_table(step["tasks"]))
    return "\n".join(parts)


def _task_table(tasks: list[dict[str, Any]]) -> str:
    rows = ["<table><tr><th>task</th><th>state</th><th>duration</th><th>attempts</th></tr>"]
    for task in tasks:
        attempts = "".join(_attempt_block(attempt) for attempt in task["attempt_list"])
        rows.append(
            f"<tr><td>{html.escape(task['name'])}<br><small>{html.escape(task['action'])}"
            f"</small></td><td>{_state(task['state'])}<br>{html.escape(task['message'])}</td>"
            f"<td>{_duration(task['started_at'], task['finished_at'])}</td>"
            f"<td>{attempts}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _attempt_block(attempt: dict[str, Any]) -> str:
    text = attempt["log"]
    if attempt["log_total_chars"] > len(text):
        text = f"[showing the last {MAX_PAGE_LOG_CHARS} characters]\n" + text
    head = (
        f"<div>#{attempt['number']} {_state(attempt['state'])}"
        f" {html.escape(attempt['message'])}</div>"
    )
    if attempt["response_excerpt"]:
        status = attempt["response_status"]
        head += (
            f"<div>response {status}:</div><pre>{html.escape(attempt['response_excerpt'])}</pre>"
        )
    return head + (f"<pre>{html.escape(text)}</pre>" if text else "")


def add_routes(app: web.Application, pool: asyncpg.Pool) -> None:
    async def page(request: web.Request) -> web.Response:
        run_id, as_json = _parse_run_id(request.match_info["run_id"])
        run = await load_run(pool, run_id)
        if run is None:
            raise web.HTTPNotFound(text=f"run {run_id} does not exist")
        if as_json:
            return web.json_response(run, dumps=_dumps)
        return web.Response(text=render_run(run), content_type="text/html")

    app.router.add_get("/runs/{run_id}", page)


def _parse_run_id(raw: str) -> tuple[int, bool]:
    as_json = raw.endswith(".json")
    digits = raw.removesuffix(".json")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise web.HTTPNotFound(text=f"invalid run id {raw!r}; run ids are whole numbers")
    return int(digits), as_json


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)
