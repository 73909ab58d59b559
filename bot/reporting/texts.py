"""Text helpers for reports: durations, one-line messages, log tails and Markdown code blocks."""

from __future__ import annotations

import re
from datetime import datetime

from bot.forges import github, gitlab
from bot.forges.models import truncate_text

_BACKTICK_RUN = re.compile(r"`+")


def status_description_limit(forge: str) -> int:
    """Return the longest commit status description the forge stores in full."""
    if forge == "github":
        return github.STATUS_DESCRIPTION_MAX_CHARS
    return gitlab.STATUS_DESCRIPTION_MAX_CHARS


def comment_limit(forge: str) -> int:
    """Return the longest comment (GitHub) or note (GitLab) body the forge stores."""
    if forge == "github":
        return github.COMMENT_MAX_CHARS
    return gitlab.NOTE_MAX_CHARS


def marked_comment(marker: str, text: str, forge: str) -> str:
    """Put `marker` first and cut `text` after it, so the body fits the forge's limit.

    The forge clients cut an overlong body at its end, and a marker there was lost.
    """
    room_chars = comment_limit(forge) - len(marker) - 1
    return f"{marker}\n{truncate_text(text, room_chars)}"


def one_line(text: str) -> str:
    """Collapse every run of whitespace, newlines included, into one space."""
    return " ".join(text.split())


def shorten(text: str, max_chars: int) -> str:
    """Return `text` on one line, cut to `max_chars` with an ellipsis."""
    return truncate_text(one_line(text), max_chars)


def short_sha(sha: str) -> str:
    return sha[:7]


def format_duration(started_at: datetime | None, finished_at: datetime | None) -> str:
    """Write the time between two moments as `42.0 s`, `3 min 05 s` or `2 h 07 min`."""
    if started_at is None or finished_at is None:
        return ""
    seconds = max(0.0, (finished_at - started_at).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def tail(text: str, max_lines: int, max_chars: int) -> str:
    """Return the last `max_lines` lines of `text`, at most `max_chars` characters.

    A cut is marked on a line of its own, so a reader knows lines are missing.
    """
    text = text.rstrip("\n")
    lines = text.split("\n")
    cut = len(lines) > max_lines
    last_lines = "\n".join(lines[-max_lines:])
    if len(last_lines) > max_chars:
        last_lines = last_lines[-max_chars:]
        # Drop the partial first line left by the character cut.
        if "\n" in last_lines:
            last_lines = last_lines.split("\n", 1)[1]
        cut = True
    return f"[earlier lines cut]\n{last_lines}" if cut else last_lines


def code_block(text: str, info: str = "text") -> str:
    """Wrap `text` in a Markdown fenced code block that `text` cannot close.

    The fence is one backtick longer than the longest run of backticks in `text`
    (CommonMark: a closing fence is at least as long as the opening one).
    """
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def inline_code(text: str) -> str:
    """Write `text` as Markdown inline code, on one line, whatever backticks it holds."""
    text = one_line(text)
    if not text:
        return ""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    ticks = "`" * (longest + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{padding}{text}{padding}{ticks}"
