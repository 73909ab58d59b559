"""Rule matching against run labels."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import regex

from pipelines_schema.models import Rule, RuleGroup
from pipelines_schema.rules import MAX_MATCHED_CHARS, compile_pattern, matches

LABELS: dict[str, Any] = {
    "event": "push",
    "branch": "release/1.2",
    "pr.labels": ["bug", "skip-ci"],
    "empty.list": [],
    "fork": False,
    "pr.number": 42,
    "nothing": None,
}

# (case, rule, expected)
RULE_CASES = [
    ("exact equal", Rule("event", exact="push"), True),
    ("exact different", Rule("event", exact="tag"), False),
    ("exact is case sensitive", Rule("event", exact="Push"), False),
    ("exact inverted equal", Rule("event", exact="push", invert=True), False),
    ("exact inverted different", Rule("event", exact="tag", invert=True), True),
    ("exact absent", Rule("tag", exact="v1"), False),
    ("exact absent inverted", Rule("tag", exact="v1", invert=True), True),
    ("exact None value", Rule("nothing", exact="None"), False),
    ("exists present", Rule("event", exists=True), True),
    ("exists absent", Rule("tag", exists=True), False),
    ("exists absent inverted", Rule("tag", exists=True, invert=True), True),
    ("exists present inverted", Rule("event", exists=True, invert=True), False),
    ("exists None value", Rule("nothing", exists=True), False),
    ("exists empty list", Rule("empty.list", exists=True), True),
    ("regex full match", Rule("branch", regex=r"release/.+"), True),
    ("regex partial match fails", Rule("branch", regex=r"release"), False),
    ("regex prefix only fails", Rule("branch", regex=r"release/\d"), False),
    ("regex inverted", Rule("branch", regex=r"main", invert=True), True),
    ("regex absent", Rule("tag", regex=r".*"), False),
    ("regex absent inverted", Rule("tag", regex=r".*", invert=True), True),
    ("list exact any element", Rule("pr.labels", exact="skip-ci"), True),
    ("list exact no element", Rule("pr.labels", exact="docs"), False),
    ("list exact inverted", Rule("pr.labels", exact="skip-ci", invert=True), False),
    ("list exact inverted no element", Rule("pr.labels", exact="docs", invert=True), True),
    ("list regex any element", Rule("pr.labels", regex=r"b.g"), True),
    ("empty list exact", Rule("empty.list", exact="x"), False),
    ("empty list exact inverted", Rule("empty.list", exact="x", invert=True), True),
    ("boolean as string", Rule("fork", exact="false"), True),
    ("boolean not Python form", Rule("fork", exact="False"), False),
    ("number as string", Rule("pr.number", exact="42"), True),
    ("number regex", Rule("pr.number", regex=r"\d+"), True),
]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [case[1:] for case in RULE_CASES],
    ids=[case[0] for case in RULE_CASES],
)
def test_rule(rule: Rule, expected: bool) -> None:
    assert matches(rule, LABELS) is expected


YES = Rule("event", exact="push")
NO = Rule("event", exact="tag")

# (case, group, expected)
GROUP_CASES = [
    ("all true", RuleGroup("all", (YES, YES)), True),
    ("all one false", RuleGroup("all", (YES, NO)), False),
    ("any one true", RuleGroup("any", (NO, YES)), True),
    ("any all false", RuleGroup("any", (NO, NO)), False),
    ("all of any", RuleGroup("all", (YES, RuleGroup("any", (NO, YES)))), True),
    ("all of failing any", RuleGroup("all", (YES, RuleGroup("any", (NO, NO)))), False),
    ("any of all", RuleGroup("any", (NO, RuleGroup("all", (YES, YES)))), True),
    (
        "three levels",
        RuleGroup("any", (NO, RuleGroup("all", (YES, RuleGroup("any", (NO, YES)))))),
        True,
    ),
    (
        "three levels failing",
        RuleGroup("any", (NO, RuleGroup("all", (YES, RuleGroup("any", (NO, NO)))))),
        False,
    ),
    (
        "inverted member",
        RuleGroup("all", (YES, Rule("pr.labels", exact="skip-ci", invert=True))),
        False,
    ),
]


@pytest.mark.parametrize(
    ("group", "expected"),
    [case[1:] for case in GROUP_CASES],
    ids=[case[0] for case in GROUP_CASES],
)
def test_group(group: RuleGroup, expected: bool) -> None:
    assert matches(group, LABELS) is expected


def test_no_rule_matches() -> None:
    assert matches(None, {}) is True


def test_empty_labels() -> None:
    assert matches(Rule("branch", exact="main"), {}) is False


def test_rule_without_test_raises() -> None:
    with pytest.raises(ValueError, match="sets none of exact, exists and regex"):
        matches(Rule("branch"), LABELS)


def test_invalid_regex_raises() -> None:
    with pytest.raises(regex.error):
        matches(Rule("branch", regex="("), LABELS)


# A pattern that backtracks exponentially on a run of "a" with no "b" after it.
BACKTRACKING = "(a|aa)+b"


def test_backtracking_regex_is_no_match() -> None:
    assert matches(Rule("branch", regex=BACKTRACKING), {"branch": "a" * 40}) is False


def test_backtracking_regex_inverted_passes() -> None:
    rule = Rule("branch", regex=BACKTRACKING, invert=True)
    assert matches(rule, {"branch": "a" * 40}) is True


def test_regex_timeout_logged_with_pattern(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipelines_schema.rules"):
        matches(Rule("branch", regex=BACKTRACKING), {"branch": "a" * 40})
    assert "timed out" in caplog.text
    assert BACKTRACKING in caplog.text


def test_regex_long_label_is_no_match() -> None:
    long_value = "a" * (MAX_MATCHED_CHARS + 1)
    assert matches(Rule("branch", regex="a+"), {"branch": long_value}) is False


def test_regex_label_at_limit_matches() -> None:
    value = "a" * MAX_MATCHED_CHARS
    assert matches(Rule("branch", regex="a+"), {"branch": value}) is True


def test_regex_compiled_once() -> None:
    assert compile_pattern(r"release/\d+") is compile_pattern(r"release/\d+")


def test_regex_unicode_property_matches() -> None:
    # `regex` syntax, which the loader checks with the same engine.
    assert matches(Rule("branch", regex=r"\p{Lu}+"), {"branch": "ÄB"}) is True
