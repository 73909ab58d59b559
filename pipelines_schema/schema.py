"""The published JSON Schema, and its errors turned into readable issues.

jsonschema's own messages quote whole Python objects and are vague for `oneOf`. Each
error here becomes an `Issue` whose message names the offending value and the fix, and
whose path is the key or value to point at.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

from pipelines_schema.problems import DocPath, format_path
from pipelines_schema.source import INVALID, Issue

SCHEMA_FILE = "kubeci.schema.json"
# A number in exponent notation, split into sign, whole part, fraction, "e", exponent
# sign and exponent.
_EXPONENT_NUMBER = re.compile(
    r"([-+]?)(?=[0-9]|\.[0-9])([0-9]*)(?:\.([0-9]*))?([eE])([-+]?)([0-9]+)"
)

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}

# Why a value fails a `pattern`, by the name of the key that contains it.
_PATTERN_HINTS = {
    "url": "must start with http:// or https:// (or with a ${...} placeholder)",
    "namespace": "must be a Kubernetes namespace: lowercase letters, digits and '-'",
    "container": "must be a container name: lowercase letters, digits and '-'",
    "service_account": "must be a Kubernetes name: lowercase letters, digits, '-' and '.'",
    "image_pull_secrets": "must be a Kubernetes name: lowercase letters, digits, '-' and '.'",
    "name": "must be a Kubernetes name: lowercase letters, digits, '-' and '.'",
    "images": "must be a container name: lowercase letters, digits and '-'",
}


@cache
def load_schema() -> dict[str, Any]:
    """Return the JSON Schema of `.kubeci.yml` (draft 2020-12)."""
    text = resources.files("pipelines_schema").joinpath(SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(definition: str | None) -> Validator:
    root = Draft202012Validator(load_schema())
    if definition is None:
        return root
    return root.evolve(schema={"$ref": f"#/$defs/{definition}"})


@dataclass(frozen=True)
class _Options:
    base: DocPath
    # Paths whose errors other checks report themselves.
    skip: Callable[[DocPath], bool]
    # Validator keywords (such as "anyOf") whose errors about the value at `base` itself
    # other checks replace.
    ignore: frozenset[str]
    # Noun for the validated value, used in messages about its own keys.
    noun: str | None


def schema_issues(
    instance: Any,
    definition: str | None = None,
    base: DocPath = (),
    *,
    skip: Callable[[DocPath], bool] = lambda path: False,
    ignore: frozenset[str] = frozenset(),
    noun: str | None = None,
) -> list[Issue]:
    """Validate `instance` against the whole schema or one of its `$defs`.

    `base` is the document path of `instance`; the issues carry full document paths.
    """
    options = _Options(base, skip, ignore, noun)
    issues: list[Issue] = []
    for error in _validator(definition).iter_errors(instance):
        issues.extend(_issues_of(error, options))
    return issues


def _issues_of(error: ValidationError, options: _Options) -> Iterator[Issue]:
    path: DocPath = (*options.base, *error.absolute_path)
    validator = str(error.validator)
    ignored = validator in options.ignore and path == options.base
    if error.instance is INVALID or options.skip(path) or ignored:
        return  # reported elsewhere
    noun = options.noun if path == options.base and options.noun else noun_of(path)
    if "propertyNames" in error.relative_schema_path:
        # The error is about a key: point at it.
        yield Issue((*path, str(error.instance)), _key_message(error), at_key=True)
    elif validator == "additionalProperties":
        yield from _unknown_keys(error, path, noun)
    elif validator == "required":
        yield from _missing_keys(error, path, noun)
    elif validator in ("oneOf", "anyOf") and error.context:
        # best_match picks the branch that came closest; its path is absolute already.
        yield from _issues_of(best_match(error.context), options)
    else:
        yield Issue(path, value_message(error, path))


def _unknown_keys(error: ValidationError, path: DocPath, noun: str) -> Iterator[Issue]:
    schema = error.schema if isinstance(error.schema, dict) else {}
    allowed = sorted(schema.get("properties", {}))
    patterns = schema.get("patternProperties", {})
    if not isinstance(error.instance, dict):
        return
    for key in error.instance:
        if key in allowed or any(re.search(pattern, key) for pattern in patterns):
            continue
        yield Issue((*path, key), unknown_key_message(key, noun, allowed), at_key=True)


def unknown_key_message(key: str, noun: str, allowed: list[str]) -> str:
    """Say that `key` is not allowed in `noun`, listing the keys that are."""
    if noun == "job" and key == "event_handlers":
        return (
            "event_handlers are not allowed on a job; put them on a step "
            "(set_job_failure, set_job_success) or a task (set_step_failure, set_step_success)"
        )
    message = f"unknown key '{key}' in {noun}; expected one of {', '.join(allowed)}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean '{close[0]}'?"
    return message


def _missing_keys(error: ValidationError, path: DocPath, noun: str) -> Iterator[Issue]:
    if not isinstance(error.instance, dict) or not isinstance(error.validator_value, list):
        return
    for key in error.validator_value:
        if key not in error.instance:
            yield Issue(path, f"missing required key '{key}' in {noun}")


def noun_of(path: DocPath) -> str:
    """Name what sits at `path`, for messages: `job`, `task`, `backoff` and so on."""
    if not path:
        return "the top level"
    last = path[-1]
    if isinstance(last, int) and len(path) >= 2:
        container = path[-2]
        nouns = {"jobs": "job", "steps": "step", "tasks": "task", "notifiers": "notifier"}
        return nouns.get(str(container), f"item {last} of '{container}'")
    return f"'{last}'"


def field_name(path: DocPath) -> str:
    """Name the key or list item at `path`, as in `timeout_s` or `command[1]`."""
    for index in range(len(path) - 1, -1, -1):
        if isinstance(path[index], str):
            return format_path(path[index:])
    return format_path(path) or "the top level"


def describe_value(value: Any) -> str:
    """Describe a value for a message: `string 'abc'`, `integer 5`, `a list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        kind = "integer" if isinstance(value, int) else "number"
        return f"{kind} {value}"
    if isinstance(value, str):
        excerpt = value if len(value) <= 60 else value[:57] + "..."
        return f"string {excerpt!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "an unreadable value"


def type_message(name: str, expected: list[str], value: Any) -> str:
    """Say that `name` must be of the expected JSON types, with a quoting or number hint."""
    words = " or ".join(_TYPE_WORDS.get(kind, kind) for kind in expected)
    message = f"{name} must be {words}, got {describe_value(value)}"
    scalar = value is None or isinstance(value, bool | int | float)
    if "string" in expected and scalar:
        written = describe_value(value).split()[-1]
        message += f'; quote it to make it a string: "{written}"'
    numeric = "number" in expected or "integer" in expected
    if numeric and isinstance(value, str):
        message += _exponent_hint(value, integer="number" not in expected)
    return message


def _exponent_hint(text: str, integer: bool) -> str:
    """Explain why YAML read `text`, a number in exponent notation, as a string.

    YAML 1.1, which PyYAML implements, reads an exponent number as a float only with a
    dot and a signed exponent: `1.0e+308`, not `1e308` or `1.0e308`.
    """
    match = _EXPONENT_NUMBER.fullmatch(text)
    if match is None:
        return ""
    sign, whole, fraction, letter, exponent_sign, exponent = match.groups()
    number = float(text)
    if integer and number.is_integer() and abs(number) < 10**15:
        fix = str(int(number))
    else:
        fix = f"{sign}{whole or '0'}.{fraction or '0'}{letter}{exponent_sign or '+'}{exponent}"
    return (
        f"; YAML reads {text} as a string, because a number with an exponent needs a dot "
        f"and a signed exponent: write {fix}"
    )


def value_message(error: ValidationError, path: DocPath) -> str:
    """Build the message for an error about a value (not about keys)."""
    name = field_name(path)
    value = error.instance
    limit = error.validator_value
    messages = {
        "type": lambda: type_message(name, _as_list(limit), value),
        "enum": lambda: _enum_message(name, limit, value),
        "const": lambda: f"{name} must be {json.dumps(limit)}, got {describe_value(value)}",
        "pattern": lambda: _pattern_message(path, value),
        "minItems": lambda: _empty_list_message(path),
        "minLength": lambda: f"{name} must not be empty",
        "maxLength": lambda: f"{name} is longer than the limit of {limit} characters",
        "minimum": lambda: f"{name} must be at least {limit}, got {describe_value(value)}",
        "maximum": lambda: f"{name} must be at most {limit}, got {describe_value(value)}",
        "exclusiveMinimum": lambda: (
            f"{name} must be greater than {limit}, got {describe_value(value)}"
        ),
        "uniqueItems": lambda: f"{name} lists the same value more than once; remove the repeats",
    }
    build = messages.get(str(error.validator))
    return build() if build else f"{name}: {error.message}"


def _as_list(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def _enum_message(name: str, allowed: Any, value: Any) -> str:
    choices = ", ".join(str(item) for item in _as_list(allowed))
    if name == "version":
        return f"unsupported version {_as_written(value)}; this KubeCI reads version {choices}"
    written = repr(value) if isinstance(value, str) else describe_value(value)
    return f"unknown {name} {written}; expected one of {choices}"


def _as_written(value: Any) -> str:
    """Write a value as YAML shows it: `'text'`, `true`, `null`, `2`; or describe a list."""
    if isinstance(value, str):
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return describe_value(value)


def _pattern_message(path: DocPath, value: Any) -> str:
    name = field_name(path)
    if len(path) == 3 and path[0] == "jobs" and path[-1] == "name":
        return (
            f"invalid job name {value!r}; use lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    key = next((str(item) for item in reversed(path) if isinstance(item, str)), "")
    hint = _PATTERN_HINTS.get(key, "does not have the expected form")
    return f"invalid {name} {value!r}; it {hint}"


def _key_message(error: ValidationError) -> str:
    key = error.instance
    if error.validator == "pattern":
        return f"invalid container name {key!r}; use lowercase letters, digits and '-'"
    return f"unknown key {key!r}; expected one of {', '.join(_as_list(error.validator_value))}"


def _empty_list_message(path: DocPath) -> str:
    key = path[-1] if path else ""
    messages = {
        "jobs": "the file has no jobs; add at least one job",
        "steps": "the job has no steps; add at least one step",
        "tasks": "the step has no tasks; add at least one task",
        "events": "the notifier has no events; list at least one event",
    }
    return messages.get(str(key), f"{field_name(path)} is empty; list at least one item")
