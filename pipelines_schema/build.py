"""Build the typed models from a document that passed every check, filling defaults."""

from __future__ import annotations

import copy
from typing import Any

from pipelines_schema.models import (
    Backoff,
    Job,
    Notifier,
    Pipeline,
    Rule,
    RuleGroup,
    RuleNode,
    Step,
    Task,
)

# Defaults written into task arguments, so a stored run shows what it used.
ARGUMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "webhook": {
        "method": "POST",
        "mode": "sync",
        "headers": {},
        "connect_timeout_s": 10,
        "request_timeout_s": 30,
    },
    "kubernetes_job": {},
    "kubernetes_deployment": {"rollback_on_failure": False},
}
# Argument values that JSON Schema calls integers even when written as 3.0.
_INTEGER_ARGUMENTS = ("replicas",)


def build_pipeline(data: dict[str, Any]) -> Pipeline:
    """Return the pipeline described by a valid document."""
    jobs = tuple(_job(job) for job in data["jobs"])
    return Pipeline(jobs=jobs, version=int(data.get("version", 1)))


def _job(data: dict[str, Any]) -> Job:
    timeout_s = data.get("timeout_s")
    return Job(
        name=data["name"],
        steps=tuple(_step(step) for step in data["steps"]),
        rules=_rules(data.get("rules")),
        timeout_s=None if timeout_s is None else float(timeout_s),
        notifiers=_notifiers(data.get("notifiers", [])),
    )


def _step(data: dict[str, Any]) -> Step:
    return Step(
        name=data["name"],
        tasks=tuple(_task(task) for task in data["tasks"]),
        rules=_rules(data.get("rules")),
        event_handlers=dict(data.get("event_handlers", {})),
        notifiers=_notifiers(data.get("notifiers", [])),
    )


def _task(data: dict[str, Any]) -> Task:
    action = data["action"]
    return Task(
        name=data["name"],
        action=action,
        arguments=_arguments(action, data["arguments"]),
        rules=_rules(data.get("rules")),
        timeout_s=float(data.get("timeout_s", 3600)),
        retries=int(data.get("retries", 0)),
        backoff=_backoff(data.get("backoff", {})),
        allow_failure=bool(data.get("allow_failure", False)),
        interruptible=bool(data.get("interruptible", action != "kubernetes_deployment")),
        event_handlers=dict(data.get("event_handlers", {})),
        notifiers=_notifiers(data.get("notifiers", [])),
    )


def _arguments(action: str, data: dict[str, Any]) -> dict[str, Any]:
    # A deep copy, because YAML aliases may share one value between several tasks.
    arguments = {**ARGUMENT_DEFAULTS[action], **copy.deepcopy(data)}
    for key in _INTEGER_ARGUMENTS:
        if key in arguments:
            arguments[key] = int(arguments[key])
    if "success_status" in arguments:
        arguments["success_status"] = [int(code) for code in arguments["success_status"]]
    return arguments


def _backoff(data: dict[str, Any]) -> Backoff:
    defaults = Backoff()
    return Backoff(
        initial_s=float(data.get("initial_s", defaults.initial_s)),
        factor=float(data.get("factor", defaults.factor)),
        max_s=float(data.get("max_s", defaults.max_s)),
    )


def _rules(data: dict[str, Any] | None) -> RuleNode | None:
    if data is None:
        return None
    for mode in ("all", "any"):
        if mode in data:
            members = tuple(_rule_member(member) for member in data[mode])
            return RuleGroup(mode="all" if mode == "all" else "any", members=members)
    return Rule(
        label=data["label"],
        exact=data.get("exact"),
        exists=data.get("exists"),
        regex=data.get("regex"),
        invert=bool(data.get("invert", False)),
    )


def _rule_member(data: dict[str, Any]) -> RuleNode:
    rule = _rules(data)
    assert rule is not None  # members are mappings once validated
    return rule


def _notifiers(items: list[dict[str, Any]]) -> tuple[Notifier, ...]:
    return tuple(_notifier(item) for item in items)


def _notifier(data: dict[str, Any]) -> Notifier:
    return Notifier(
        name=data["name"],
        type=data["type"],
        events=tuple(data["events"]),
        url=data["url"],
        method=data.get("method", "POST"),
        headers=dict(data.get("headers", {})),
        body=copy.deepcopy(data.get("body")),
        text=data.get("text"),
        verify_tls=bool(data.get("verify_tls", True)),
    )
