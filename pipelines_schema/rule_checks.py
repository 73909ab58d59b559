"""Check `rules:` values with messages aimed at the usual mistakes.

The schema describes rules with `oneOf`, whose errors from jsonschema name every branch
at once. These checks decide first whether a value is meant as a group or a rule, then
report exactly what is wrong with it.
"""

from __future__ import annotations

from typing import Any

import regex

from pipelines_schema.problems import DocPath
from pipelines_schema.rules import compile_pattern
from pipelines_schema.schema import (
    describe_value,
    field_name,
    type_message,
    unknown_key_message,
)
from pipelines_schema.source import INVALID, Issue

RULE_KEYS = ("label", "exact", "exists", "regex", "invert")
RULE_TESTS = ("exact", "exists", "regex")
GROUP_MODES = ("all", "any")
_EXAMPLE = "{label: branch, exact: main}"


def check_rules(value: Any, path: DocPath) -> list[Issue]:
    """Check one rule or group at `path`, and every member of a group."""
    if value is INVALID:
        return []
    if not isinstance(value, dict):
        message = (
            f"{field_name(path)} must be a rule such as {_EXAMPLE} or a group "
            f"{{all: [...]}} or {{any: [...]}}, got {_kind(value)}"
        )
        return [Issue(path, message)]
    if any(mode in value for mode in GROUP_MODES):
        return _check_group(value, path)
    return _check_rule(value, path)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list (wrap several rules in all: or any:)"
    return describe_value(value)


def _check_group(group: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = []
    modes = [mode for mode in GROUP_MODES if mode in group]
    if len(modes) == 2:
        message = "a rule group contains either 'all' or 'any', not both; nest one inside the other"
        issues.append(Issue((*path, "any"), message, at_key=True))
    for key in group:
        if key not in GROUP_MODES:
            message = (
                f"unknown key '{key}' in a rule group; a group contains only 'all' or 'any' "
                "with a list of rules"
            )
            issues.append(Issue((*path, key), message, at_key=True))
    for mode in modes:
        issues.extend(_check_members(group[mode], (*path, mode)))
    return issues


def _check_members(members: Any, path: DocPath) -> list[Issue]:
    mode = path[-1]
    if members is INVALID:
        return []
    if not isinstance(members, list):
        return [Issue(path, f"{mode} must be a list of rules, got {describe_value(members)}")]
    if not members:
        return [Issue(path, f"{mode} is empty; list at least one rule")]
    issues = []
    for index, member in enumerate(members):
        issues.extend(check_rules(member, (*path, index)))
    return issues


def _check_rule(rule: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = []
    for key in rule:
        if key not in RULE_KEYS:
            message = unknown_key_message(key, "rule", list(RULE_KEYS))
            issues.append(Issue((*path, key), message, at_key=True))
    issues.extend(_check_label(rule, path))
    tests = [key for key in RULE_TESTS if key in rule]
    if not tests:
        label = rule.get("label")
        subject = f"the rule on label '{label}'" if isinstance(label, str) else "a rule"
        message = f"{subject} needs one of exact, exists or regex, as in {_EXAMPLE}"
        issues.append(Issue(path, message))
    for extra in tests[1:]:
        message = (
            f"a rule has one test, but this one has both '{tests[0]}' and '{extra}'; "
            "keep one, or combine rules with all: or any:"
        )
        issues.append(Issue((*path, extra), message, at_key=True))
    issues.extend(_check_test_values(rule, path))
    return issues


def _check_label(rule: dict[str, Any], path: DocPath) -> list[Issue]:
    if "label" not in rule:
        message = f"missing required key 'label' in rule; name the label to test, as in {_EXAMPLE}"
        return [Issue(path, message)]
    label = rule["label"]
    if label is INVALID:
        return []
    if not isinstance(label, str):
        return [Issue((*path, "label"), type_message("label", ["string"], label))]
    if not label:
        return [Issue((*path, "label"), "label must not be empty; name the label to test")]
    return []


def _check_test_values(rule: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = []
    checks = {
        "exact": _check_string,
        "regex": _check_regex,
        "exists": _check_exists,
        "invert": _check_invert,
    }
    for key, check in checks.items():
        if key in rule and rule[key] is not INVALID:
            message = check(key, rule[key])
            if message:
                issues.append(Issue((*path, key), message))
    return issues


def _check_string(key: str, value: Any) -> str | None:
    return None if isinstance(value, str) else type_message(key, ["string"], value)


def _check_regex(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return type_message(key, ["string"], value)
    try:
        compile_pattern(value)
    except regex.error as error:
        return f"invalid regex {value!r}: {error}"
    except (RecursionError, OverflowError):
        return f"invalid regex {value!r}: it nests or repeats too deeply; simplify it"
    return None


def _check_exists(key: str, value: Any) -> str | None:
    if value is True:
        return None
    if value is False:
        return (
            "exists: false is not supported; to match when the label is absent, "
            "write exists: true with invert: true"
        )
    return f"exists must be true, got {describe_value(value)}"


def _check_invert(key: str, value: Any) -> str | None:
    return None if isinstance(value, bool) else type_message(key, ["boolean"], value)
