"""Make text storable in Postgres.

Postgres `text` and `jsonb` reject the NUL character, and asyncpg cannot encode a lone
surrogate (which Python strings may contain after `surrogateescape` decoding or a JSON
`\\ud800` escape) as UTF-8. Text from outside (process output, response bodies, error
messages) goes through `clean_text` before it is stored.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """Return `value` with each NUL and each surrogate replaced by U+FFFD.

    Python stores a character outside the BMP as one code point, so two surrogates that
    would form a UTF-16 pair are replaced one by one.
    """
    return _UNSTORABLE.sub(REPLACEMENT, value)


def clean_json(value: Any) -> Any:
    """Return a copy of a JSON-like value with `clean_text` applied to every string.

    Mapping keys are cleaned too. Values other than str, dict, list and tuple are
    returned as they are.
    """
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_json(key): clean_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(item) for item in value]
    return value
