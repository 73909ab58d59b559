"""Logging set-up: text or JSON lines, with ids attached to each record.

Modules log through `logging.getLogger(__name__)` and pass ids in `extra`, for example
`log.info("task started", extra={"run_id": 7, "task_id": 12})`. The formatters print
every id they find.
"""

from __future__ import annotations

import json
import logging
import sys
import time

ID_FIELDS = (
    "delivery_id",
    "forge",
    "repository",
    "run_id",
    "job_id",
    "step_id",
    "task_id",
    "attempt_id",
    "outbox_id",
    "worker_id",
)


def _ids(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in ID_FIELDS if hasattr(record, name)}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _ids(record)
        if ids:
            line += " [" + " ".join(f"{key}={value}" for key, value in ids.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Send log records to stderr as text (`fmt="text"`) or JSON lines (`fmt="json"`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
