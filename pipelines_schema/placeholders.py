"""`${name}` placeholders in task arguments and notifiers.

A placeholder is `${` followed by a name and `}`. `$${` stands for a literal `${`, so
`$${sha}` renders as the text `${sha}`. A `${` with no closing `}` is left as written
(the loader reports it). Placeholders are found in strings inside lists and mapping
values, never in mapping keys.

Known names: the run labels (`LABEL_NAMES`), `labels.NAME` for a custom label added by
a manual run, `run.id`, `run.url`, `callback_url` and `secrets.NAME`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

LABEL_NAMES: tuple[str, ...] = (
    "forge",
    "event",
    "trigger",
    "repository",
    "sha",
    "ref",
    "branch",
    "tag",
    "pr.number",
    "pr.source_branch",
    "pr.target_branch",
    "pr.labels",
    "author",
    "fork",
    "comment.author",
)
RUN_NAMES: tuple[str, ...] = ("run.id", "run.url", "callback_url")
CALLBACK_URL = "callback_url"

SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CUSTOM_LABEL = re.compile(r"labels\.\S+")
_OPENING = re.compile(r"\$\$\{|\$\{")
_KNOWN = frozenset(LABEL_NAMES + RUN_NAMES)


class MissingValue(LookupError):
    """Raised by a resolver for a placeholder that has no value in this run."""

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        super().__init__(message or f"the run has no value for ${{{name}}}")


def _pieces(text: str) -> Iterator[tuple[str, str]]:
    """Split text into ("text", text), ("name", name) and ("unclosed", tail) pieces.

    Escapes are applied: `$${` comes out as the text `${`.
    """
    position = 0
    while True:
        opening = _OPENING.search(text, position)
        if opening is None:
            yield "text", text[position:]
            return
        yield "text", text[position : opening.start()]
        if opening.group() == "$${":
            yield "text", "${"
            position = opening.end()
            continue
        closing = text.find("}", opening.end())
        if closing < 0:
            yield "unclosed", text[opening.start() :]
            return
        yield "name", text[opening.end() : closing]
        position = closing + 1


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def find_placeholders(value: Any) -> set[str]:
    """Return the names of every placeholder in the strings inside `value`."""
    return {piece for text in _strings(value) for kind, piece in _pieces(text) if kind == "name"}


def find_unterminated(value: Any) -> list[str]:
    """Return the tails of strings in `value` that open a placeholder and never close it."""
    return [
        piece for text in _strings(value) for kind, piece in _pieces(text) if kind == "unclosed"
    ]


def render(value: Any, resolve: Callable[[str], str]) -> Any:
    """Return a deep copy of `value` with each placeholder replaced by `resolve(name)`.

    Strings are rendered inside lists, tuples and mapping values; keys and other values
    are copied as they are. Whatever `resolve` raises, `MissingValue` included,
    propagates.
    """
    if isinstance(value, str):
        pieces = _pieces(value)
        return "".join(str(resolve(piece)) if kind == "name" else piece for kind, piece in pieces)
    if isinstance(value, dict):
        return {key: render(item, resolve) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, resolve) for item in value]
    if isinstance(value, tuple):
        return tuple(render(item, resolve) for item in value)
    return value


def is_known_placeholder(name: str) -> bool:
    """Tell whether `name` may appear as `${name}` in a pipeline file."""
    if name in _KNOWN:
        return True
    if "${" in name:
        return False  # a nested placeholder, as in ${labels.${x}}
    if name.startswith("secrets."):
        return SECRET_NAME.fullmatch(name.removeprefix("secrets.")) is not None
    return _CUSTOM_LABEL.fullmatch(name) is not None
