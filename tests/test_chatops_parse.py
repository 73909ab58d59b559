"""Chat-ops command parsing: what counts as a command in a pull request comment."""

from __future__ import annotations

import pytest

from bot.chatops.parse import Command, parse_commands, visible_lines

CASES: list[tuple[str, str, list[str]]] = [
    # id, comment body, expected commands
    ("plain", "/retest", ["/retest"]),
    ("empty", "", []),
    ("prose only", "Looks good to me.", []),
    ("surrounding whitespace", "   /retest \t\n", ["/retest"]),
    ("upper case", "/RETEST", ["/retest"]),
    ("mixed case with argument", "/Test Build", ["/test build"]),
    ("crlf", "thanks\r\n/retest\r\n", ["/retest"]),
    ("lone cr", "thanks\r/cancel\r", ["/cancel"]),
    ("nbsp before", "\u00a0/retest", ["/retest"]),
    ("nbsp inside argument", "/test\u00a0build", ["/test build"]),
    ("narrow nbsp and ideographic space", "\u202f/test\u3000lint", ["/test lint"]),
    ("zero-width space", "\u200b/retest\u200b", ["/retest"]),
    ("byte order mark", "\ufeff/help", ["/help"]),
    ("later line", "Flaky again.\n\n/retest", ["/retest"]),
    ("in prose", "please /retest this", []),
    ("path in prose", "/usr/bin/env is missing", []),
    ("slash only", "/ retest", []),
    ("slash digit", "/123", []),
    ("trailing punctuation", "/retest.", []),
    ("several", "/retest\n/test lint\n/help", ["/retest", "/test lint", "/help"]),
    ("duplicates", "/retest\n/RETEST\n /retest ", ["/retest"]),
    ("same name other argument", "/test a\n/test b", ["/test a", "/test b"]),
    ("argument collapsed", "/test   build\t lint", ["/test build lint"]),
    ("argument ends at line end", "/test build\nlint", ["/test build"]),
    ("argument of retest kept", "/retest please", ["/retest please"]),
    ("unknown", "/deploy prod", ["/deploy prod"]),
    ("unknown and known", "/lgtm\n/retest", ["/lgtm", "/retest"]),
    ("ok-to-test", "/ok-to-test", ["/ok-to-test"]),
    ("fenced backticks", "```\n/retest\n```", []),
    ("fenced with info string", "```console\n$ /retest\n/retest\n```\n/cancel", ["/cancel"]),
    ("fenced tildes", "~~~\n/retest\n~~~\n/help", ["/help"]),
    ("fence closed by longer fence", "```\n/retest\n`````\n/help", ["/help"]),
    ("fence not closed by shorter", "````\n/retest\n```\n/cancel\n````\n/help", ["/help"]),
    ("tilde fence not closed by backticks", "~~~\n/retest\n```\n/cancel", []),
    ("unclosed fence", "text\n```\n/retest", []),
    ("indented fence", "  ```\n  /retest\n  ```", []),
    ("fence crlf", "```\r\n/retest\r\n```\r\n/help", ["/help"]),
    ("inline code", "`/retest`", []),
    ("inline code then command", "`x` /retest", []),
    ("inline code mid-line", "type `/retest` to rerun", []),
    ("double backtick code", "``/retest ` still code``", []),
    ("inline code over two lines", "see `foo\n/retest` here", []),
    ("unmatched backtick", "` /retest", []),
    ("unmatched backtick before command line", "a ` b\n/retest", ["/retest"]),
    ("inline code as argument", "/test `build`", ["/test build"]),
    ("triple backticks inline", "```/retest```", []),
    ("quoted", "> /retest", []),
    ("quoted indented", "   > /retest", []),
    ("quoted nested", ">> /retest", []),
    ("quote then command", "> /retest\n\n/cancel", ["/cancel"]),
    ("quote lazy continuation", "> said\n/retest\n\n/cancel", ["/cancel"]),
    ("quote of two lines then text", "> a\n> b\n/retest", []),
    ("empty quote line ends paragraph", "> said\n>\n/retest", ["/retest"]),
    ("indented code after blank", "see:\n\n    /retest", []),
    ("indented code at start", "    /retest", []),
    ("tab indented code", "\t/retest", []),
    ("spaces and tab reach four columns", "  \t/retest", []),
    ("three spaces are not code", "   /retest", ["/retest"]),
    ("indented paragraph continuation", "please\n    /retest", ["/retest"]),
    ("indented code after heading", "# Steps\n    /retest", []),
    ("indented code after fence", "```\nx\n```\n    /retest", []),
    ("indented code with blank line", "    x\n\n    /retest\n/cancel", ["/cancel"]),
    ("indented quote is code", "    > x\n/retest", ["/retest"]),
    ("pre block", "<pre>\n/retest\n</pre>\n/cancel", ["/cancel"]),
    ("pre block upper case with attribute", "<PRE class=x>\n/retest\n</PRE>", []),
    ("pre block unterminated", "<pre>\n/retest", []),
    ("pre block on one line", "<pre>/retest</pre>\n/cancel", ["/cancel"]),
    ("script block", "<script>\n/retest\n</script>", []),
    ("pre inside prose is inline", "a <pre>b</pre>\n/retest", ["/retest"]),
    ("html comment", "<!-- /retest -->", []),
    ("html comment multi-line", "<!--\n/retest\n-->\n/help", ["/help"]),
    ("html comment unterminated", "<!--\n/retest", []),
    ("trailing html comment", "/retest <!-- flaky network -->", ["/retest"]),
    ("trailing html comment on argument", "/test lint<!-- x -->", ["/test lint"]),
    ("html comment before command", "<!-- x --> /retest", ["/retest"]),
    ("html comment spanning into command", "<!-- x\ny --> /cancel", ["/cancel"]),
    ("fence inside html comment", "<!--\n```\n-->\n/retest", ["/retest"]),
    ("html comment inside fence", "```\n<!--\n```\n/retest", ["/retest"]),
    ("html comment opener in code", "`<!--`\n/retest", ["/retest"]),
    ("fullwidth", "\uff0fretest", ["/retest"]),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [(body, expected) for _, body, expected in CASES],
    ids=[c[0] for c in CASES],
)
def test_parse_commands_table(body: str, expected: list[str]) -> None:
    assert [str(command) for command in parse_commands(body)] == expected


def test_command_known_names() -> None:
    assert Command("retest").known
    assert Command("ok-to-test").known
    assert not Command("lgtm").known


def test_command_parts() -> None:
    (command,) = parse_commands("/TEST  Build")
    assert command.name == "test"
    assert command.argument == "build"


def test_command_without_argument_is_empty() -> None:
    (command,) = parse_commands("/cancel")
    assert command.argument == ""


def test_visible_lines_drop_hidden_text() -> None:
    body = "intro\n```\ncode\n```\n> quote\n<!-- note -->\noutro"
    assert visible_lines(body) == ["intro", "outro"]


def test_parse_unterminated_openers() -> None:
    body = "`" * 5000 + "\n" + "<!--" * 2000 + "\n/retest"
    assert parse_commands(body) == []


def test_parse_reads_only_the_first_65536_chars() -> None:
    assert parse_commands("x" * 70000 + "\n/retest") == []
