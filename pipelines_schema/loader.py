"""Load `.kubeci.yml` text into a `Pipeline`, or report every problem in it at once.

The steps: check the size, read the YAML with positions (`source`), validate the
document against the JSON Schema (`schema`), run the checks the schema cannot express
(`checks`), then build the models (`build`). Each problem carries the file name, the
line and column (from 1) of the offending key or value, and its document path, such as
`jobs[0].steps[1].tasks[0].action`. No input makes the loader raise anything but
`PipelineError`.
"""

from __future__ import annotations

import logging

from pipelines_schema.build import build_pipeline
from pipelines_schema.checks import check_pipeline, is_checked_here
from pipelines_schema.models import Pipeline
from pipelines_schema.problems import PipelineError, Problem, format_path
from pipelines_schema.schema import describe_value, schema_issues
from pipelines_schema.source import INVALID, Document, Issue, Position, position_of_index, read_yaml

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PROBLEMS",
    "PipelineError",
    "Problem",
    "file_too_large",
    "load_pipeline",
    "validate_text",
]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1024 * 1024
MAX_PROBLEMS = 1000
DEFAULT_FILENAME = ".kubeci.yml"


def load_pipeline(text: str | bytes, filename: str = DEFAULT_FILENAME) -> Pipeline:
    """Return the pipeline in `text`; bytes are read as UTF-8.

    Raises PipelineError, whose `problems` list every error with its position.
    """
    problems, data = _analyse(text, filename)
    if problems:
        raise PipelineError(problems)
    assert isinstance(data, dict)
    return build_pipeline(data)


def validate_text(text: str | bytes, filename: str = DEFAULT_FILENAME) -> list[Problem]:
    """Return every problem in `text`, sorted by position; an empty list means valid."""
    problems, _ = _analyse(text, filename)
    return problems


def _analyse(text: str | bytes, filename: str) -> tuple[list[Problem], object]:
    size_bytes = (
        len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    )
    if size_bytes > MAX_FILE_BYTES:
        return [file_too_large(filename, size_bytes)], None
    if isinstance(text, bytes):
        decoded = _decode(text, filename)
        if isinstance(decoded, Problem):
            return [decoded], None
        text = decoded
    read = read_yaml(text)
    if read.document is None:
        return _problems(read.issues, None, filename), None
    issues = read.issues + _document_issues(read.document)
    problems = _problems(issues, read.document, filename)
    if problems:
        log.debug("pipeline file %s has %d problems", filename, len(problems))
    return problems, read.document.data


def file_too_large(filename: str, size_bytes: int) -> Problem:
    """Return the problem for a file over `MAX_FILE_BYTES`."""
    message = (
        f"the file is {size_bytes} bytes, over the limit of {MAX_FILE_BYTES} bytes (1 MiB); "
        "split it or move long values out of it"
    )
    return Problem(filename, 1, 1, "", message)


def _decode(data: bytes, filename: str) -> str | Problem:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        prefix = data[: error.start].decode("utf-8", "replace")
        position = position_of_index(prefix, len(prefix))
        message = (
            f"the file is not valid UTF-8: byte 0x{data[error.start]:02x} at offset {error.start}; "
            "save the file as UTF-8"
        )
        return Problem(filename, position.line, position.column, "", message)


def _document_issues(document: Document) -> list[Issue]:
    data = document.data
    if data is INVALID:
        return []
    if data is None:
        message = "the file is empty; a pipeline file is a mapping with a 'jobs' list"
        return [Issue((), message)]
    if not isinstance(data, dict):
        message = f"the top level must be a mapping with a 'jobs' list, got {describe_value(data)}"
        return [Issue((), message)]
    return schema_issues(data, skip=is_checked_here) + check_pipeline(data)


def _problems(issues: list[Issue], document: Document | None, filename: str) -> list[Problem]:
    problems: dict[Problem, None] = {}
    for issue in issues:
        position = issue.position
        if position is None:
            position = document.position(issue.path, issue.at_key) if document else Position(1, 1)
        path = format_path(issue.path)
        problems[Problem(filename, position.line, position.column, path, issue.message)] = None
    ordered = sorted(problems, key=lambda p: (p.line, p.column, p.path, p.message))
    if len(ordered) > MAX_PROBLEMS:
        rest = len(ordered) - MAX_PROBLEMS
        last = ordered[MAX_PROBLEMS - 1]
        summary = Problem(filename, last.line, last.column, "", f"{rest} more problems not shown")
        ordered = [*ordered[:MAX_PROBLEMS], summary]
    return ordered
