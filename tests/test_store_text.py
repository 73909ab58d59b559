"""`clean_text` and `clean_json`: text that Postgres can store."""

from __future__ import annotations

import asyncpg

from bot.store.text import clean_json, clean_text


def test_clean_text_replaces_nul() -> None:
    assert clean_text("a\x00b") == "a\ufffdb"


def test_clean_text_replaces_lone_surrogate() -> None:
    assert clean_text("a\udcffb") == "a\ufffdb"


def test_clean_text_keeps_other_characters() -> None:
    text = "tab\tline\nescape\x1b é 😀"
    assert clean_text(text) == text


def test_clean_json_cleans_keys_and_nesting() -> None:
    value = {"k\x00": ["\x00", {"n": 1, "s": "\ud800"}], "none": None}
    assert clean_json(value) == {"k\ufffd": ["\ufffd", {"n": 1, "s": "\ufffd"}], "none": None}


async def test_clean_text_stored_by_postgres(db: asyncpg.Pool) -> None:
    stored = await db.fetchval("SELECT $1::text", clean_text("a\x00b\ud800"))
    assert stored == "a\ufffdb\ufffd"
