"""Fixtures for outbound HTTP tests: fake webhook targets on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.target import FakeTarget


@pytest.fixture
async def fake_target() -> AsyncIterator[FakeTarget]:
    """A running fake webhook target; see `FakeTarget.script` to choose its replies."""
    target = await FakeTarget().start()
    try:
        yield target
    finally:
        await target.close()


@pytest.fixture
async def callback_receiver() -> AsyncIterator[FakeTarget]:
    """A second fake server, for tests that need somewhere to receive callbacks."""
    target = await FakeTarget().start()
    try:
        yield target
    finally:
        await target.close()
