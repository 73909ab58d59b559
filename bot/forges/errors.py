"""Exceptions of the forge API clients, one tree for GitHub and GitLab.

Each error carries the HTTP status (None when no response arrived), the response
headers and an excerpt of the response body. `transient` is true for errors where a
later attempt may succeed.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping

BODY_EXCERPT_CHARS = 500


def body_excerpt(body: bytes | str | None, limit: int = BODY_EXCERPT_CHARS) -> str:
    """Return the first `limit` characters of a response body, decoded leniently."""
    if body is None:
        return ""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return text if len(text) <= limit else text[:limit] + "…"


class ForgeError(Exception):
    """A forge API call failed."""

    transient = False

    def __init__(
        self,
        message: str,
        *,
        forge: str,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
    ) -> None:
        super().__init__(message)
        self.forge = forge
        self.status = status
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}
        self.body = body_excerpt(body)


class ForgeNotFound(ForgeError):
    """404 or 410: the repository, object or file does not exist or is not visible."""


class ForgeAuthError(ForgeError):
    """401 or 403: the credentials are invalid, expired or lack a permission."""


class ForgeRateLimited(ForgeError):
    """A primary or secondary rate limit was hit. Retry after `retry_after_s` seconds."""

    transient = True

    def __init__(
        self,
        message: str,
        *,
        forge: str,
        retry_after_s: float,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
    ) -> None:
        super().__init__(message, forge=forge, status=status, headers=headers, body=body)
        self.retry_after_s = retry_after_s


class ForgeServerError(ForgeError):
    """5xx: the forge failed, and a later attempt may succeed."""

    transient = True


class ForgeConnectionError(ForgeServerError):
    """No response: the connection failed or the call timed out."""


class ForgeClientError(ForgeError):
    """Another 4xx: the request is invalid and repeating it will not help."""


class ForgeResponseError(ForgeError):
    """The forge responded with success but a body KubeCI cannot read."""


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Read a `Retry-After` header (seconds or an HTTP date), or return None if invalid."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_s)


def seconds_until_epoch(value: str | None, now_s: float) -> float | None:
    """Read a reset header that contains a Unix time, such as `x-ratelimit-reset`."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()) - now_s)
    except ValueError:
        return None
