"""Match rules against a run's labels.

A rule tests one label: `exact` (string equality), `exists` (the label is present) or
`regex` (`re.fullmatch`), and `invert` negates the result. A label that is absent, or
None, fails `exact` and `regex`, so it passes their inverted form. A list-valued label
(`pr.labels`) matches when any element matches. Numbers and booleans compare by their
string form: `True` as "true", `42` as "42". Groups combine rules: `all` needs every
member to match, `any` at least one; groups nest to any depth.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pipelines_schema.models import Rule, RuleGroup, RuleNode


def matches(rule: RuleNode | None, labels: Mapping[str, Any]) -> bool:
    """Tell whether the labels satisfy the rule; no rule (None) always matches.

    Raises `re.error` for an invalid `regex` (the loader rejects those) and ValueError
    for a rule that sets none of `exact`, `exists` and `regex`.
    """
    if rule is None:
        return True
    if isinstance(rule, RuleGroup):
        results = (matches(member, labels) for member in rule.members)
        return all(results) if rule.mode == "all" else any(results)
    return _test(rule, labels) != rule.invert


def _test(rule: Rule, labels: Mapping[str, Any]) -> bool:
    value = labels.get(rule.label)
    if rule.exists is not None:
        return value is not None
    if value is None:
        return False
    values = value if isinstance(value, list | tuple) else [value]
    texts = [label_text(item) for item in values]
    if rule.exact is not None:
        return rule.exact in texts
    if rule.regex is not None:
        pattern = re.compile(rule.regex)
        return any(pattern.fullmatch(text) is not None for text in texts)
    raise ValueError(f"rule on label {rule.label!r} sets none of exact, exists and regex")


def label_text(value: Any) -> str:
    """Return a label value as rules compare it: booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
