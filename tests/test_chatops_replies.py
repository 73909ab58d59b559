"""Chat-ops reply texts and the marked bodies that reporting posts."""

from __future__ import annotations

from bot.chatops.parse import Command
from bot.chatops.replies import code_list, refusal, unknown_commands, unknown_jobs
from bot.forges.github import COMMENT_MAX_CHARS
from bot.reporting.texts import marked_comment

MARKER = "<!-- kubeci:reply:0123abcd -->"


def test_code_list_caps_names() -> None:
    text = code_list(f"j{index}" for index in range(25))
    assert text.startswith("`j0`, `j1`")
    assert "`j19`" in text
    assert "`j20`" not in text
    assert text.endswith(" and 5 more")


def test_code_list_of_twenty_names_is_whole() -> None:
    assert "more" not in code_list(f"j{index}" for index in range(20))


def test_code_list_empty_is_none() -> None:
    assert code_list([]) == "none"


def test_unknown_jobs_names_each_once() -> None:
    text = unknown_jobs(["x", "x", "y"], ["build"])
    assert text.count("`x`") == 1


def test_unknown_commands_counts_names() -> None:
    text = unknown_commands([Command("x", "a"), Command("x", "b")])
    assert text.startswith("`/x` is not a KubeCI command")


def test_refusal_names_each_command_once() -> None:
    text = refusal([Command("test", "a"), Command("test", "b")], "octo-org/widgets")
    assert text.count("`/test`") == 1


def test_marked_comment_puts_marker_first() -> None:
    assert marked_comment(MARKER, "Done.", "github") == f"{MARKER}\nDone."


def test_marked_comment_cuts_text_to_limit() -> None:
    body = marked_comment(MARKER, "x" * 70_000, "github")
    assert body.startswith(MARKER)
    assert len(body) == COMMENT_MAX_CHARS
    assert body.endswith("…")


def test_marked_comment_gitlab_keeps_long_text() -> None:
    body = marked_comment(MARKER, "x" * 70_000, "gitlab")
    assert body == f"{MARKER}\n{'x' * 70_000}"
