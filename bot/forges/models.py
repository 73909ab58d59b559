"""Forge-neutral shapes returned by the GitHub and GitLab clients, and text limits."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from bot.forges.errors import ForgeResponseError

# Commit status states as KubeCI reports them. Each client maps them to its forge:
# GitHub has no `running` or `canceled` (they become `pending` and `error`), and GitLab
# names `failure` and `error` both `failed`.
StatusState = Literal["pending", "running", "success", "failure", "error", "canceled"]

PullRequestState = Literal["open", "closed", "merged"]

# GitHub repository roles, highest first. `none` means no access at all.
Permission = Literal["admin", "maintain", "write", "triage", "read", "none"]
WRITE_PERMISSIONS: frozenset[str] = frozenset({"admin", "maintain", "write"})


@dataclass(frozen=True)
class PullRequest:
    """A GitHub pull request or GitLab merge request, as the API reports it now."""

    # GitHub PR number or GitLab MR iid.
    number: int
    state: PullRequestState
    head_sha: str
    head_ref: str
    base_ref: str
    # GitHub: full names (head is None for a deleted fork). GitLab: project ids as text.
    head_repository: str | None
    base_repository: str
    author: str
    author_id: int | None
    labels: tuple[str, ...]
    draft: bool
    fork: bool


@dataclass(frozen=True)
class Comment:
    """A comment on a pull request (GitHub) or a note on a merge request (GitLab)."""

    id: int
    body: str
    author: str
    # True for GitHub users of type Bot and for GitLab system notes.
    author_is_bot: bool = False


K = TypeVar("K")


def response_field(data: Any, key: str, kind: type[K], *, forge: str, what: str) -> K:
    """Read `data[key]` from a decoded API response and check its type.

    Raises ForgeResponseError naming the call and the field when `data` is not an
    object, the key is absent, or the value has another type.
    """
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ForgeResponseError(
            f"{forge} {what}: response field {key!r} is missing or not {kind.__name__}",
            forge=forge,
        )
    return value


_ZERO_WIDTH_JOINER = "\u200d"


def _continues_cluster(char: str) -> bool:
    """Tell whether `char` belongs to the character before it on screen."""
    code = ord(char)
    return (
        unicodedata.category(char) in ("Mn", "Mc", "Me")
        or char == _ZERO_WIDTH_JOINER
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0x1F3FB <= code <= 0x1F3FF  # emoji skin tones
        or 0xE0020 <= code <= 0xE007F  # emoji tag characters
    )


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def truncate_text(text: str, max_chars: int, marker: str = "…") -> str:
    """Shorten `text` to at most `max_chars` code points, ending with `marker`.

    The cut never separates a character from its combining marks, a variation
    selector or skin tone, never ends on a zero-width joiner and never splits a
    flag's pair of regional indicators.
    """
    if len(text) <= max_chars:
        return text
    if max_chars <= len(marker):
        return marker[:max_chars]
    cut = max_chars - len(marker)
    while cut > 0 and _continues_cluster(text[cut]):
        cut -= 1
    while cut > 0 and text[cut - 1] == _ZERO_WIDTH_JOINER:
        cut -= 1
    indicators = 0
    while cut - indicators > 0 and _is_regional_indicator(text[cut - indicators - 1]):
        indicators += 1
    if indicators % 2 == 1 and _is_regional_indicator(text[cut]):
        cut -= 1
    return text[:cut] + marker
