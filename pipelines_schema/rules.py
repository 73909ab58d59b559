"""Match rules against a run's labels.

A rule tests one label: `exact` (string equality), `exists` (the label is present) or
`regex` (a full match), and `invert` negates the result. A label that is absent, or
None, fails `exact` and `regex`, so it passes their inverted form. A list-valued label
(`pr.labels`) matches when any element matches. Numbers and booleans compare by their
string form: `True` as "true", `42` as "42". Groups combine rules: `all` needs every
member to match, `any` at least one; groups nest to any depth.

Patterns run on the `regex` package, whose matching accepts a timeout, because a
pattern such as `(a|aa)+b` can backtrack for hours on a short label. A regex rule whose
matching runs out of time, or whose label value is longer than `MAX_MATCHED_CHARS`,
counts as no match (so its inverted form passes) and is logged as a warning.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import regex

from pipelines_schema.models import Rule, RuleGroup, RuleNode

log = logging.getLogger(__name__)

# Time one regex rule may spend on all the values of its label, in seconds.
REGEX_TIMEOUT_S = 0.1
# Label values longer than this are not matched, which bounds the work of one match.
MAX_MATCHED_CHARS = 4096


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """Compile a rule pattern once; raise `regex.error` when it is invalid.

    The same function checks patterns at validation, so the syntax accepted there is
    the one used here.
    """
    return regex.compile(pattern)


def matches(rule: RuleNode | None, labels: Mapping[str, Any]) -> bool:
    """Tell whether the labels satisfy the rule; no rule (None) always matches.

    Raises `regex.error` for an invalid `regex` (the loader rejects those) and ValueError
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
        return _regex_matches(rule.label, rule.regex, texts)
    raise ValueError(f"rule on label {rule.label!r} sets none of exact, exists and regex")


def _regex_matches(label: str, pattern_text: str, texts: list[str]) -> bool:
    pattern = compile_pattern(pattern_text)
    deadline = time.monotonic() + REGEX_TIMEOUT_S
    for text in texts:
        if len(text) > MAX_MATCHED_CHARS:
            log.warning(
                "rule regex %r not matched against label %s: its value has %d characters, "
                "over the limit of %d; counted as no match",
                pattern_text,
                label,
                len(text),
                MAX_MATCHED_CHARS,
            )
            continue
        try:
            if pattern.fullmatch(text, timeout=max(0.0, deadline - time.monotonic())):
                return True
        except TimeoutError:
            log.warning(
                "rule regex %r timed out after %g s on label %s; counted as no match, "
                "simplify the pattern",
                pattern_text,
                REGEX_TIMEOUT_S,
                label,
            )
            return False
    return False


def label_text(value: Any) -> str:
    """Return a label value as rules compare it: booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
