"""Problems found in a pipeline file, and how their locations are written."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# A location inside the loaded document: mapping keys and list indexes, outermost first.
DocPath = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# Control characters and surrogates, written as \uXXXX in quoted keys.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def format_path(path: DocPath) -> str:
    """Write a document path as `jobs[0].steps[1].tasks[0].action`.

    Keys that are not plain identifiers are quoted, as in `headers["X-Api-Key"]`, with
    control characters escaped, as in `env["A\\u0000"]`.
    """
    parts: list[str] = []
    for element in path:
        if isinstance(element, int):
            parts.append(f"[{element}]")
        elif _PLAIN_KEY.fullmatch(element):
            parts.append(f".{element}" if parts else element)
        else:
            escaped = element.replace("\\", "\\\\").replace('"', '\\"')
            escaped = _UNPRINTABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", escaped)
            parts.append(f'["{escaped}"]')
    return "".join(parts)


@dataclass(frozen=True)
class Problem:
    """One error in a pipeline file; `line` and `column` count from 1."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def format(self) -> str:
        """Write the problem as `FILE:LINE:COLUMN: PATH: MESSAGE` (no PATH when empty)."""
        where = f"{self.file}:{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


class PipelineError(ValueError):
    """Raised by the loader for an invalid pipeline file; `problems` lists every error."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        heading = "1 problem" if count == 1 else f"{count} problems"
        lines = [problem.format() for problem in problems]
        super().__init__(f"invalid pipeline file, {heading}:\n" + "\n".join(lines))
