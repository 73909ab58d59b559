"""Pipeline secrets: `${secrets.NAME}` values from the server's configuration.

A secret comes from the environment variable `KUBECI_SECRET_<NAME>` or, failing that,
from the file `<KUBECI_SECRETS_DIR>/<NAME>` (the layout of a mounted Kubernetes Secret).
Files are read on every lookup, so a rotated secret takes effect without a restart.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from bot.config import Settings

log = logging.getLogger(__name__)

MASK = "***"
# How many times over a JSON-escaped secret is still masked.
JSON_ESCAPE_LEVELS = 2
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def encoded_forms(value: str) -> set[str]:
    """Return the forms in which `value` may appear in text that KubeCI stores.

    Targets often echo a request back: JSON escapes quotes, backslashes and (by default)
    non-ASCII characters, and a JSON request body echoed inside a JSON response is escaped
    twice. URLs and forms percent-encode. `shlex.quote` is how the local backend writes
    a command line.
    """
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")}
    forms.add(shlex.quote(value))
    escaped = {value}
    for _ in range(JSON_ESCAPE_LEVELS):
        escaped = {
            _json_escape(form, ascii_only) for form in escaped for ascii_only in (True, False)
        }
        forms |= escaped
    return forms


def _json_escape(text: str, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)[1:-1]


class SecretNotFound(LookupError):
    """No secret of this name is configured."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class SecretStore:
    """Looks up secrets by name and masks their values in text."""

    def __init__(self, values: Mapping[str, str] | None = None, directory: str = "") -> None:
        self._values = dict(values or {})
        self._directory = Path(directory) if directory else None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretStore:
        return cls(settings.secrets, settings.secrets_dir)

    def get(self, name: str) -> str:
        """Return the secret `name`; raise `SecretNotFound` saying how to configure it."""
        if name in self._values:
            return self._values[name]
        if _NAME.fullmatch(name) and self._directory is not None:
            value = self._read_file(self._directory / name)
            if value is not None:
                return value
        where = f" or add the file {self._directory / name}" if self._directory else ""
        raise SecretNotFound(
            name, f"secret {name!r} is not configured; set KUBECI_SECRET_{name}{where}"
        )

    def values(self) -> list[str]:
        """Return every configured secret value, longest first, for masking."""
        found = [value for value in self._values.values() if value]
        if self._directory is not None and self._directory.is_dir():
            for path in self._directory.iterdir():
                if _NAME.fullmatch(path.name):
                    value = self._read_file(path)
                    if value:
                        found.append(value)
        return sorted(set(found), key=len, reverse=True)

    def mask(self, text: str) -> str:
        """Replace every secret value in `text` with `***`, in each form of `encoded_forms`."""
        forms = {form for value in self.values() for form in encoded_forms(value)}
        # Longest first, so that a form containing another is replaced whole.
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, MASK)
        return text

    @staticmethod
    def _read_file(path: Path) -> str | None:
        # One trailing newline is dropped: `echo token > file` should give "token".
        try:
            if not path.is_file():
                return None
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read secret file %s: %s", path, exc)
            return None
        return text.removesuffix("\n").removesuffix("\r")
