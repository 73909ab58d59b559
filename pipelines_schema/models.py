"""Typed models of a loaded `.kubeci.yml`.

The loader builds these from a validated document. `to_dict` and `from_dict` convert a
whole pipeline to and from plain JSON, which is how runs store the pipeline they execute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ActionName = Literal["webhook", "kubernetes_job", "kubernetes_deployment"]
ACTIONS: tuple[str, ...] = ("webhook", "kubernetes_job", "kubernetes_deployment")

JOB_EVENTS: tuple[str, ...] = ("started", "complete", "failed", "succeeded")
STEP_EVENTS: tuple[str, ...] = ("started", "complete", "failed", "succeeded")
TASK_EVENTS: tuple[str, ...] = ("started", "attempt_failed", "complete", "failed", "succeeded")

# Events a handler may be attached to, and the actions it may take, per level.
HANDLER_EVENTS: tuple[str, ...] = ("failed", "succeeded")
STEP_HANDLER_ACTIONS: tuple[str, ...] = ("set_job_failure", "set_job_success")
TASK_HANDLER_ACTIONS: tuple[str, ...] = ("set_step_failure", "set_step_success")


@dataclass(frozen=True)
class Rule:
    """One label test: exactly one of `exact`, `exists` or `regex` is set."""

    label: str
    exact: str | None = None
    exists: bool | None = None
    regex: str | None = None
    invert: bool = False


@dataclass(frozen=True)
class RuleGroup:
    """`all` (every member matches) or `any` (at least one matches)."""

    mode: Literal["all", "any"]
    members: tuple[Rule | RuleGroup, ...]


RuleNode = Rule | RuleGroup


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 5.0
    factor: float = 2.0
    max_s: float = 300.0


@dataclass(frozen=True)
class Notifier:
    name: str
    type: Literal["webhook", "slack"]
    events: tuple[str, ...]
    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # webhook: a template (string, mapping or list); None sends the event
    text: str | None = None  # slack: message template; None uses a default summary
    verify_tls: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    action: ActionName
    arguments: dict[str, Any]
    rules: RuleNode | None = None
    timeout_s: float = 3600.0
    retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    allow_failure: bool = False
    interruptible: bool = True  # the loader defaults it to False for kubernetes_deployment
    event_handlers: dict[str, str] = field(default_factory=dict)
    notifiers: tuple[Notifier, ...] = ()


@dataclass(frozen=True)
class Step:
    name: str
    tasks: tuple[Task, ...]
    rules: RuleNode | None = None
    event_handlers: dict[str, str] = field(default_factory=dict)
    notifiers: tuple[Notifier, ...] = ()


@dataclass(frozen=True)
class Job:
    name: str
    steps: tuple[Step, ...]
    rules: RuleNode | None = None
    timeout_s: float | None = None
    notifiers: tuple[Notifier, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    jobs: tuple[Job, ...]
    version: int = 1

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


def to_dict(pipeline: Pipeline) -> dict[str, Any]:
    """Convert a pipeline to plain JSON-compatible data (rule groups keep their mode)."""
    return asdict(pipeline)


def _rule_from(data: dict[str, Any] | None) -> RuleNode | None:
    if data is None:
        return None
    if "mode" in data:
        return RuleGroup(
            mode=data["mode"],
            members=tuple(m for m in (_rule_from(item) for item in data["members"]) if m),
        )
    return Rule(**data)


def _notifiers_from(items: list[dict[str, Any]]) -> tuple[Notifier, ...]:
    return tuple(Notifier(**{**item, "events": tuple(item["events"])}) for item in items)


def _task_from(data: dict[str, Any]) -> Task:
    return Task(
        **{
            **data,
            "rules": _rule_from(data.get("rules")),
            "backoff": Backoff(**data["backoff"]),
            "notifiers": _notifiers_from(data.get("notifiers", [])),
        }
    )


def _step_from(data: dict[str, Any]) -> Step:
    return Step(
        **{
            **data,
            "tasks": tuple(_task_from(task) for task in data["tasks"]),
            "rules": _rule_from(data.get("rules")),
            "notifiers": _notifiers_from(data.get("notifiers", [])),
        }
    )


def from_dict(data: dict[str, Any]) -> Pipeline:
    """Rebuild a pipeline from the output of `to_dict`."""
    jobs = []
    for job in data["jobs"]:
        jobs.append(
            Job(
                **{
                    **job,
                    "steps": tuple(_step_from(step) for step in job["steps"]),
                    "rules": _rule_from(job.get("rules")),
                    "notifiers": _notifiers_from(job.get("notifiers", [])),
                }
            )
        )
    return Pipeline(jobs=tuple(jobs), version=data.get("version", 1))
