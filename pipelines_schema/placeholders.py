"""`${name}` placeholders in pipeline values.

`$${` writes a literal `${`. Names are letters, digits, `_`, `.` and `-`
(`${sha}`, `${pr.number}`, `${secrets.TOKEN}`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# `$${` first, so that an escaped `${` is never read as a placeholder.
_TOKEN = re.compile(r"\$\$\{|\$\{([A-Za-z0-9_.\-]+)\}")


class MissingValue(LookupError):
    """A placeholder names a value that is not available."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def find_placeholders(value: Any) -> set[str]:
    """Return the placeholder names used anywhere in a string, list or mapping."""
    if isinstance(value, str):
        return {match.group(1) for match in _TOKEN.finditer(value) if match.group(1)}
    if isinstance(value, dict):
        found: set[str] = set()
        for item in value.values():
            found |= find_placeholders(item)
        return found
    if isinstance(value, list | tuple):
        found = set()
        for item in value:
            found |= find_placeholders(item)
        return found
    return set()


def render(value: Any, resolve: Callable[[str], str]) -> Any:
    """Replace every placeholder in the strings of `value` with `resolve(name)`.

    Mappings and lists are copied with their strings rendered; other values are
    returned unchanged. `resolve` raises `MissingValue` for a name it cannot fill.
    """
    if isinstance(value, str):
        return _TOKEN.sub(lambda match: resolve(match.group(1)) if match.group(1) else "${", value)
    if isinstance(value, dict):
        return {key: render(item, resolve) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, resolve) for item in value]
    return value
