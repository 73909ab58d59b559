"""Pytest fixtures for the forge fakes.

Load them for the whole suite with `pytest_plugins = ["tests.fakes.fixtures"]` in
tests/conftest.py, or import them into one test module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.github import FakeGitHub
from tests.fakes.gitlab import FakeGitLab


@dataclass(frozen=True)
class RsaKeyPair:
    private_pem: str
    public_pem: str


def make_rsa_key_pair() -> RsaKeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RsaKeyPair(private_pem.decode(), public_pem.decode())


@pytest.fixture(scope="session")
def github_app_key() -> RsaKeyPair:
    """An RSA key pair for a test GitHub App, made once per session because it is slow."""
    return make_rsa_key_pair()


@pytest.fixture
async def fake_github() -> AsyncIterator[FakeGitHub]:
    fake = FakeGitHub()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
