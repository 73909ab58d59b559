"""Chat-ops command parsing: a pull request comment's text in, its commands out.

No I/O happens here. A command is a line whose first word is `/name`, in the text a
reader sees once GitHub or GitLab renders the comment as Markdown (CommonMark):

- Fenced code blocks (three or more backticks or tildes, closed by a fence of the same
  character at least as long, or running to the end of the comment) are dropped.
- Indented code blocks are dropped: lines indented by four or more columns (a tab
  counts to the next multiple of four) at the start of the comment, after a blank
  line, after a heading or after another such line. An indented line that continues
  a paragraph is paragraph text and counts.
- HTML `<pre>`, `<script>`, `<style>` and `<textarea>` blocks are dropped, from the
  line that opens one up to the end of the line that closes it (or to the end of the
  comment).
- HTML comments, on one line or across several, are dropped and leave the text around
  them. An unterminated `<!--` hides the rest of the comment, as it does in Markdown.
- A line that starts with an inline code span is not a command. Inside a command's
  argument the span's content counts as text, so `/test `build`` names the job build.
- Quotes are dropped: lines starting with `>`, and the lines after a quoted line of
  text up to the next blank line, which Markdown renders inside the quote.
- Line endings may be `\\n`, `\\r\\n` or `\\r`. Unicode spaces such as U+00A0 count as
  spaces, zero-width characters are removed, and case does not matter.

The first word must be a slash and a word (`/retest`, `/ok-to-test`). A word with a
further slash (`/usr/bin`) or one that does not start with a letter is prose, not a
command. The rest of the line is the command's argument. Up to three columns of
leading whitespace do not matter.

NOTE: list items are not tracked, so a line indented by four columns after a blank
line inside a list item is dropped, although Markdown renders it as a paragraph of
the item. Dropping errs on the safe side: a command that is not run can be typed again.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

KNOWN_COMMANDS = ("retest", "test", "cancel", "ok-to-test", "help")

# GitHub's limit for a comment. GitLab allows a million characters per note, but the
# parser ignores text beyond this limit. Code spans make its work quadratic in the
# length of one paragraph, so the limit bounds it.
MAX_BODY_CHARS = 65536

# Inline code spans become CODE_START + content + CODE_END. Both are private-use
# characters, which `_normalise` removes from the comment first.
CODE_START = "\ue000"
CODE_END = "\ue001"

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\ue000\ue001"))

_HIDDEN = re.compile(
    # In CommonMark, the info string of a backtick fence cannot contain a backtick.
    r"(?P<fence>^[ \t]*(?P<ticks>`{3,})[^`\n]*(?:\n.*?)??"
    r"(?:\n[ \t]*(?P=ticks)`*[ \t]*(?=\n|\Z)|\Z))"
    r"|(?P<tilde_fence>^[ \t]*(?P<tildes>~{3,})[^\n]*(?:\n.*?)??"
    r"(?:\n[ \t]*(?P=tildes)~*[ \t]*(?=\n|\Z)|\Z))"
    # CommonMark's HTML block of kind 1 ends with the line holding any of the end tags.
    r"|(?P<html_block>^[ ]{0,3}<(?i:pre|script|style|textarea)(?=[ \t>]|$).*?"
    r"(?:</(?i:pre|script|style|textarea)>[^\n]*|\Z))"
    r"|(?P<comment><!--.*?(?:-->|\Z))"
    # A code span ends at the next backtick run of the same length. It may continue on
    # the next line, but not across a blank line.
    r"|(?P<code>(?<!`)(?P<span_ticks>`++)(?P<span_body>(?:(?!\n[ \t]*\n).)*?)"
    r"(?<!`)(?P=span_ticks)(?!`))"
    r"|(?P<lone_ticks>`+)",
    re.DOTALL | re.MULTILINE,
)

_COMMAND_WORD = re.compile(r"/(?P<name>[a-z][a-z0-9_-]{0,39})")
_HEADING = re.compile(r"#{1,6}(?: |$)")
# Columns of indentation that make a line outside a paragraph an indented code block.
CODE_INDENT_COLUMNS = 4


@dataclass(frozen=True)
class Command:
    """One command of a comment: its name without the slash, and its argument.

    Both are lower-case. The argument has its whitespace collapsed, and it is "" when
    nothing follows the command on its line.
    """

    name: str
    argument: str = ""

    @property
    def known(self) -> bool:
        return self.name in KNOWN_COMMANDS

    def __str__(self) -> str:
        return f"/{self.name} {self.argument}".rstrip()


def _normalise(body: str) -> str:
    text = body.replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    # NFKC turns fullwidth and other compatibility forms into plain ones, and the loop
    # turns every Unicode space (U+00A0, U+2007, U+3000...) into a plain space.
    text = unicodedata.normalize("NFKC", text)
    # Tabs stay, because they count to the next multiple of four columns of indentation.
    return "".join(" " if char.isspace() and char not in "\n\t" else char for char in text)


def _visible(match: re.Match[str]) -> str:
    if any(match[block] is not None for block in ("fence", "tilde_fence", "html_block")):
        # Keep the line breaks so the lines after the block stay lines of their own.
        return "\n" * match.group().count("\n")
    if match["comment"] is not None:
        return ""
    if match["code"] is not None:
        content = " ".join(match["span_body"].split())
        return f"{CODE_START}{content}{CODE_END}"
    return match.group()


def visible_lines(body: str) -> list[str]:
    """Return the rendered lines of `body`, without code blocks, comments and quotes.

    Inline code spans stay, wrapped in CODE_START and CODE_END. Only the first
    MAX_BODY_CHARS characters are read.
    """
    text = _HIDDEN.sub(_visible, _normalise(body[:MAX_BODY_CHARS]))
    lines: list[str] = []
    # Whether the line before leaves a paragraph open, and whether it is a quote's.
    paragraph = quote = False
    for raw in text.split("\n"):
        line = raw.strip().replace("\t", " ")
        if not line:
            paragraph = quote = False
        elif not paragraph and _indent_columns(raw) >= CODE_INDENT_COLUMNS:
            continue
        elif line.startswith(">"):
            # A quoted line of text opens a paragraph, which the lines after it
            # continue up to a blank line ("lazy continuation").
            paragraph = quote = bool(line.lstrip("> "))
        elif not quote:
            lines.append(line)
            paragraph = _HEADING.match(line) is None
    return lines


def _indent_columns(line: str) -> int:
    text = line.lstrip(" \t")
    return len(line[: len(line) - len(text)].expandtabs(CODE_INDENT_COLUMNS))


def _command_in(line: str) -> Command | None:
    first, _, rest = line.partition(" ")
    match = _COMMAND_WORD.fullmatch(first.lower())
    if match is None:
        return None
    argument = rest.replace(CODE_START, " ").replace(CODE_END, " ")
    return Command(match["name"], " ".join(argument.lower().split()))


def parse_commands(body: str) -> list[Command]:
    """Return the commands in a comment body, in order, each distinct command once."""
    # A dict keeps the first of equal commands in order, without a quadratic search.
    found = (_command_in(line) for line in visible_lines(body))
    return list(dict.fromkeys(command for command in found if command is not None))
