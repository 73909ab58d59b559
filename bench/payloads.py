"""Signed GitHub push deliveries of about 8 KB, each with its own delivery id and head SHA.

The body follows the shape of GitHub's push event (ref, before, after, repository,
pusher, sender, commits, head_commit). The signature is `X-Hub-Signature-256`: HMAC-SHA256
of the raw body with the webhook secret, as GitHub sends it:
https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

BODY_SIZE_BYTES = 8 * 1024
ZERO_SHA = "0" * 40
_AFTER_MARK = "a" * 40
_BRANCH_MARK = "bench-branch-mark"


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_valid(secret: bytes, body: bytes, header: str | None) -> bool:
    """Constant-time check of an `X-Hub-Signature-256` header."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


def _commit(repository: str, number: int) -> dict[str, Any]:
    sha = hashlib.sha1(f"{repository}:{number}".encode()).hexdigest()
    return {
        "id": sha,
        "tree_id": hashlib.sha1(sha.encode()).hexdigest(),
        "distinct": True,
        "message": f"Change module {number}: tighten input checks and update its tests",
        "timestamp": "2024-05-02T10:15:00+02:00",
        "url": f"https://github.com/{repository}/commit/{sha}",
        "author": {"name": "Ada Bench", "email": "ada@example.com", "username": "ada"},
        "committer": {"name": "Ada Bench", "email": "ada@example.com", "username": "ada"},
        "added": [f"src/module_{number}/new_{i}.py" for i in range(2)],
        "removed": [],
        "modified": [f"src/module_{number}/file_{i}.py" for i in range(4)],
    }


def _repository(repository: str) -> dict[str, Any]:
    owner, name = repository.split("/")
    return {
        "id": 123456,
        "name": name,
        "full_name": repository,
        "private": False,
        "owner": {"login": owner, "id": 654321, "type": "Organization"},
        "html_url": f"https://github.com/{repository}",
        "clone_url": f"https://github.com/{repository}.git",
        "default_branch": "main",
        "fork": False,
    }


def _template(repository: str, size_bytes: int) -> dict[str, Any]:
    user = {"login": "ada", "id": 42, "type": "User"}
    body: dict[str, Any] = {
        "ref": f"refs/heads/{_BRANCH_MARK}",
        "before": "b" * 40,
        "after": _AFTER_MARK,
        "created": False,
        "deleted": False,
        "forced": False,
        "compare": f"https://github.com/{repository}/compare/bbbbbbbbbbbb...{_AFTER_MARK[:12]}",
        "repository": _repository(repository),
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": user,
        "commits": [],
    }
    # Add commits while the body, head_commit included, stays within size_bytes.
    while True:
        commits = [*body["commits"], _commit(repository, len(body["commits"]))]
        bigger = {**body, "commits": commits, "head_commit": {**commits[-1], "id": _AFTER_MARK}}
        if body["commits"] and len(json.dumps(bigger)) > size_bytes:
            return _pad_message(body, size_bytes)
        body = bigger


def _pad_message(body: dict[str, Any], size_bytes: int) -> dict[str, Any]:
    """Lengthen the head commit's message so the body is `size_bytes` long."""
    missing = size_bytes - len(json.dumps(body)) - 2
    if missing > 0:
        words = ("Explain the change in more detail. " * (missing // 35 + 1))[:missing]
        head = body["head_commit"]
        body["head_commit"] = {**head, "message": head["message"] + "\n\n" + words}
    return body


class PushDeliveries:
    """Makes signed push deliveries; number `i` gets a fresh delivery id and head SHA."""

    def __init__(
        self,
        secret: str,
        repository: str = "bench-org/bench-repo",
        *,
        size_bytes: int = BODY_SIZE_BYTES,
        branches: int = 64,
    ) -> None:
        self.secret = secret.encode()
        self.repository = repository
        self.branches = branches
        self._template = json.dumps(_template(repository, size_bytes)).encode()

    def delivery(self, i: int) -> tuple[bytes, dict[str, str]]:
        """Body and headers of delivery number `i`."""
        after = hashlib.sha1(f"bench-{i}-{uuid.uuid4()}".encode()).hexdigest()
        body = self._template.replace(_AFTER_MARK.encode(), after.encode()).replace(
            _BRANCH_MARK.encode(), f"bench-{i % self.branches}".encode()
        )
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/bench",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "1001",
            "X-Hub-Signature-256": signature(self.secret, body),
        }
        return body, headers

    def ping(self) -> tuple[bytes, dict[str, str]]:
        """A signed `ping` delivery, which an intake accepts without starting a run."""
        body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1001}).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": signature(self.secret, body),
        }
        return body, headers
