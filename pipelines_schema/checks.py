"""Checks that the JSON Schema cannot express, or whose schema errors would read poorly.

The schema pass reports everything outside four subtrees of each job, step and task:
`rules`, `notifiers`, `event_handlers` and `arguments`. These checks report those
subtrees themselves (see `is_checked_here`), plus unique names, handler and event names
per level, and placeholders. Every check accepts any data, because the schema errors of
the same document have not stopped anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from pipelines_schema.models import (
    ACTIONS,
    HANDLER_EVENTS,
    JOB_EVENTS,
    STEP_EVENTS,
    STEP_HANDLER_ACTIONS,
    TASK_EVENTS,
    TASK_HANDLER_ACTIONS,
)
from pipelines_schema.placeholders import (
    CALLBACK_URL,
    LABEL_NAMES,
    RUN_NAMES,
    find_placeholders,
    find_unterminated,
    is_known_placeholder,
)
from pipelines_schema.problems import DocPath, format_path
from pipelines_schema.rule_checks import check_rules
from pipelines_schema.schema import (
    describe_value,
    field_name,
    load_schema,
    schema_issues,
    type_message,
    unknown_key_message,
)
from pipelines_schema.source import INVALID, Issue

CHECKED_HERE = frozenset({"rules", "notifiers", "event_handlers", "arguments"})
LEVEL_EVENTS = {"job": JOB_EVENTS, "step": STEP_EVENTS, "task": TASK_EVENTS}
# Notifier fields whose strings are templates.
NOTIFIER_TEMPLATES = ("url", "headers", "body", "text")
_UNIQUE_SCOPE = {
    "job": "job names must be unique in the file",
    "step": "step names must be unique in a job",
    "task": "task names must be unique in a step",
    "notifier": "notifier names must be unique in one notifiers list",
}


def is_checked_here(path: DocPath) -> bool:
    """Tell whether `path` lies in a subtree that these checks report on."""
    if len(path) < 3 or path[0] != "jobs" or not isinstance(path[1], int):
        return False
    rest = path[2:]
    for container in ("steps", "tasks"):
        if len(rest) >= 3 and rest[0] == container and isinstance(rest[1], int):
            rest = rest[2:]
        else:
            break
    return rest[0] in CHECKED_HERE


def check_pipeline(data: dict[str, Any]) -> list[Issue]:
    """Run every check on a document whose top level is a mapping."""
    jobs = data.get("jobs")
    if not isinstance(jobs, list):
        return []
    issues = _duplicate_names(jobs, ("jobs",), "job")
    for index, job in enumerate(jobs):
        if isinstance(job, dict):
            issues.extend(_check_job(job, ("jobs", index)))
    return issues


def _children(owner: dict[str, Any], key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    items = owner.get(key)
    if isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield index, item


def _check_job(job: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = _check_rules_and_notifiers(job, path, "job")
    steps = job.get("steps")
    if isinstance(steps, list):
        issues.extend(_duplicate_names(steps, (*path, "steps"), "step"))
    for index, step in _children(job, "steps"):
        issues.extend(_check_step(step, (*path, "steps", index)))
    return issues


def _check_step(step: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = _check_rules_and_notifiers(step, path, "step")
    if "event_handlers" in step:
        issues.extend(_check_event_handlers(step["event_handlers"], path, "step"))
    tasks = step.get("tasks")
    if isinstance(tasks, list):
        issues.extend(_duplicate_names(tasks, (*path, "tasks"), "task"))
    for index, task in _children(step, "tasks"):
        issues.extend(_check_task(task, (*path, "tasks", index)))
    return issues


def _check_task(task: dict[str, Any], path: DocPath) -> list[Issue]:
    issues = _check_rules_and_notifiers(task, path, "task")
    if "event_handlers" in task:
        issues.extend(_check_event_handlers(task["event_handlers"], path, "task"))
    issues.extend(_check_arguments(task, path))
    if isinstance(task.get("arguments"), dict):
        arguments = task["arguments"]
        callback = task.get("action") == "webhook" and arguments.get("mode") == "async"
        hint = ""
        if task.get("action") == "kubernetes_job":
            hint = "; the pod of a kubernetes_job gets its callback URL in KUBECI_CALLBACK_URL"
        issues.extend(_check_placeholders(arguments, (*path, "arguments"), callback, hint))
    return issues


def _check_rules_and_notifiers(owner: dict[str, Any], path: DocPath, level: str) -> list[Issue]:
    issues = []
    if "rules" in owner:
        issues.extend(check_rules(owner["rules"], (*path, "rules")))
    if "notifiers" in owner:
        issues.extend(_check_notifiers(owner["notifiers"], (*path, "notifiers"), level))
    return issues


def _duplicate_names(items: list[Any], path: DocPath, noun: str) -> list[Issue]:
    issues = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name not in first_index:
            first_index[name] = index
            continue
        first = format_path((*path, first_index[name]))
        message = (
            f"duplicate {noun} name '{name}': {first} has it too, and {_UNIQUE_SCOPE[noun]}; "
            "rename one of them"
        )
        issues.append(Issue((*path, index, "name"), message))
    return issues


# -- event handlers ----------------------------------------------------------------


def _check_event_handlers(handlers: Any, owner: DocPath, level: str) -> list[Issue]:
    path = (*owner, "event_handlers")
    allowed, other = STEP_HANDLER_ACTIONS, TASK_HANDLER_ACTIONS
    if level == "task":
        allowed, other = other, allowed
    if handlers is INVALID:
        return []
    if not isinstance(handlers, dict):
        message = type_message("event_handlers", ["object"], handlers)
        return [Issue(path, f"{message}, as in {{failed: {allowed[0]}}}")]
    issues = []
    for event, action in handlers.items():
        if event not in HANDLER_EVENTS:
            message = f"unknown handler event '{event}'; handlers take failed or succeeded"
            if event in TASK_EVENTS:
                message += f" ('{event}' can only go to notifiers)"
            issues.append(Issue((*path, event), message, at_key=True))
        action_message = _handler_action_message(action, level, allowed, other)
        if action_message:
            issues.append(Issue((*path, event), action_message))
    return issues


def _handler_action_message(
    action: Any, level: str, allowed: tuple[str, ...], other: tuple[str, ...]
) -> str | None:
    if action is INVALID or action in allowed:
        return None
    if not isinstance(action, str):
        return type_message("the handler action", ["string"], action)
    if action in other:
        return (
            f"'{action}' is not allowed on a {level}; a {level} handler takes "
            f"{' or '.join(allowed)}"
        )
    return f"unknown handler action '{action}'; expected one of {', '.join(allowed)}"


# -- notifiers ---------------------------------------------------------------------


def _check_notifiers(notifiers: Any, path: DocPath, level: str) -> list[Issue]:
    if notifiers is INVALID:
        return []
    if not isinstance(notifiers, list):
        return [Issue(path, type_message("notifiers", ["array"], notifiers))]
    issues = _duplicate_names(notifiers, path, "notifier")
    for index, notifier in enumerate(notifiers):
        issues.extend(_check_notifier(notifier, (*path, index), level))
    return issues


def _check_notifier(notifier: Any, path: DocPath, level: str) -> list[Issue]:
    if notifier is INVALID:
        return []
    if not isinstance(notifier, dict):
        return [Issue(path, type_message(field_name(path), ["object"], notifier))]
    kind = notifier.get("type")
    if "type" not in notifier:
        return [Issue(path, "missing required key 'type' in notifier; expected webhook or slack")]
    if kind not in ("webhook", "slack"):
        if kind is INVALID:
            return []
        message = f"unknown notifier type {_quoted(kind)}; expected one of webhook, slack"
        return [Issue((*path, "type"), message)]
    issues = schema_issues(notifier, f"{kind}_notifier", path, noun=f"{kind} notifier")
    issues.extend(_check_notifier_events(notifier.get("events"), (*path, "events"), level))
    templates = {key: notifier[key] for key in NOTIFIER_TEMPLATES if key in notifier}
    issues.extend(_check_placeholders(templates, path, callback_allowed=False, in_notifier=True))
    return issues


def _check_notifier_events(events: Any, path: DocPath, level: str) -> list[Issue]:
    if not isinstance(events, list):
        return []  # the schema pass reports it
    known = LEVEL_EVENTS[level]
    issues = []
    for index, event in enumerate(events):
        if not isinstance(event, str) or event in known:
            continue
        message = f"unknown {level} event '{event}'; expected one of {', '.join(known)}"
        if event in TASK_EVENTS:
            message += f" ('{event}' happens only to tasks)"
        issues.append(Issue((*path, index), message))
    return issues


def _quoted(value: Any) -> str:
    return repr(value) if isinstance(value, str) else describe_value(value)


# -- task arguments ------------------------------------------------------------------


def _check_arguments(task: dict[str, Any], path: DocPath) -> list[Issue]:
    action = task.get("action")
    arguments = task.get("arguments", INVALID)
    if action not in ACTIONS or arguments is INVALID:
        return []  # the schema pass reports an unknown action or missing arguments
    path = (*path, "arguments")
    if not isinstance(arguments, dict):
        return [Issue(path, type_message("arguments", ["object"], arguments))]
    noun = f"{action} arguments"
    if action == "kubernetes_job":
        return _check_kubernetes_job(arguments, path)
    if action == "kubernetes_deployment":
        issues = schema_issues(
            arguments,
            "kubernetes_deployment_arguments",
            path,
            ignore=frozenset({"anyOf"}),
            noun=noun,
        )
        if not any(key in arguments for key in ("images", "replicas", "env")):
            message = (
                "the kubernetes_deployment arguments change nothing; "
                "set at least one of images, replicas or env"
            )
            issues.append(Issue(path, message))
        return issues
    return schema_issues(arguments, "webhook_arguments", path, noun=noun)


def _check_kubernetes_job(arguments: dict[str, Any], path: DocPath) -> list[Issue]:
    definitions = load_schema()["$defs"]
    inline = list(definitions["kubernetes_job_inline_arguments"]["properties"])
    with_manifest = list(definitions["kubernetes_job_manifest_arguments"]["properties"])
    has_manifest = "manifest" in arguments
    if has_manifest:
        definition = "kubernetes_job_manifest_arguments"
    else:
        definition = "kubernetes_job_inline_arguments"
    # Keys are checked below, against both forms at once.
    issues = schema_issues(
        arguments, definition, path, ignore=frozenset({"additionalProperties", "required"})
    )
    if not has_manifest and "image" not in arguments:
        message = (
            "missing required key 'image' in kubernetes_job arguments; give the image of "
            "an inline container, or a full Job in 'manifest'"
        )
        issues.append(Issue(path, message))
    allowed = sorted(set(inline) | set(with_manifest))
    for key in arguments:
        if has_manifest and key in inline and key not in with_manifest:
            message = (
                f"'{key}' cannot be combined with 'manifest'; "
                "set it in the manifest's pod template instead"
            )
            issues.append(Issue((*path, key), message, at_key=True))
        elif key not in allowed:
            message = unknown_key_message(key, "kubernetes_job arguments", allowed)
            issues.append(Issue((*path, key), message, at_key=True))
    return issues


# -- placeholders ------------------------------------------------------------------


def _strings(value: Any, path: DocPath) -> Iterator[tuple[str, DocPath]]:
    if isinstance(value, str):
        yield value, path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))


# Notifier templates may also name the event they report, e.g. ${event.name}.
EVENT_FIELDS = frozenset(
    ("scope", "name", "run_id", "job", "step", "task", "state", "message", "attempt", "at")
)


def _check_placeholders(
    value: Any,
    path: DocPath,
    callback_allowed: bool,
    callback_hint: str = "",
    in_notifier: bool = False,
) -> list[Issue]:
    issues = []
    for text, text_path in _strings(value, path):
        for name in sorted(find_placeholders(text)):
            event_field = name.removeprefix("event.")
            if in_notifier and name.startswith("event.") and event_field in EVENT_FIELDS:
                continue
            message = _placeholder_message(name, callback_allowed)
            if message:
                issues.append(
                    Issue(text_path, message + (callback_hint if name == CALLBACK_URL else ""))
                )
        for tail in find_unterminated(text):
            excerpt = tail if len(tail) <= 40 else tail[:37] + "..."
            message = (
                f"unclosed placeholder {excerpt!r}; close it with '}}', "
                "or write $${ for a literal ${"
            )
            issues.append(Issue(text_path, message))
    return issues


def _placeholder_message(name: str, callback_allowed: bool) -> str | None:
    if name == CALLBACK_URL:
        if callback_allowed:
            return None
        return (
            "${callback_url} is only available in the arguments of a webhook task with mode: async"
        )
    if is_known_placeholder(name):
        return None
    if "${" in name:
        return (
            f"nested placeholder: '${{{name}' opens another '${{' inside a placeholder, "
            "and placeholders cannot be nested. Write the name itself, as in ${labels.NAME}, "
            "and $${ for a literal ${"
        )
    if name.startswith("secrets."):
        return (
            f"invalid secret name in ${{{name}}}; a secret name contains only letters, "
            "digits and '_', and does not start with a digit"
        )
    message = f"unknown placeholder ${{{name}}}"
    close = difflib.get_close_matches(name.strip(), LABEL_NAMES + RUN_NAMES, n=1, cutoff=0.6)
    if close:
        message += f" (did you mean ${{{close[0]}}}?)"
    return (
        f"{message}; use a run label such as ${{sha}} or ${{branch}}, ${{labels.NAME}}, "
        "${run.id}, ${run.url} or ${secrets.NAME}, and write $${ for a literal ${"
    )
