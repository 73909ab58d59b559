"""The intake's cache of decoded pipeline files."""

from __future__ import annotations

import pytest

from bot.intake.service import PipelineCache
from pipelines_schema.loader import PipelineError

VALID = b"""\
version: 1
jobs:
  - name: build
    steps:
      - name: compile
        tasks:
          - name: call
            action: webhook
            arguments:
              url: "http://127.0.0.1:9/hook"
"""


def test_cache_same_content_reuses_pipeline() -> None:
    cache = PipelineCache()
    first = cache.load(VALID, ".kubeci.yml")
    assert cache.load(bytes(VALID), ".kubeci.yml") is first


def test_cache_other_filename_decodes_again() -> None:
    cache = PipelineCache()
    first = cache.load(VALID, ".kubeci.yml")
    assert cache.load(VALID, ".kubeci.yaml") is not first


def test_cache_invalid_file_raises_every_time() -> None:
    cache = PipelineCache()
    for _ in range(2):
        with pytest.raises(PipelineError):
            cache.load(b"version: 1\njobs: 3\n", ".kubeci.yml")


def test_cache_evicts_least_recently_used() -> None:
    cache = PipelineCache(max_entries=2)
    first = cache.load(VALID, "a.yml")
    cache.load(VALID, "b.yml")
    cache.load(VALID, "a.yml")
    cache.load(VALID, "c.yml")
    assert cache.load(VALID, "a.yml") is first
    assert len(cache._entries) == 2
