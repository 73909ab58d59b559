"""Text that Postgres can store."""

from __future__ import annotations

import re

# Postgres text cannot hold NUL, and UTF-8 cannot encode lone surrogates.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """Replace NUL characters and lone surrogates with U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", value)
