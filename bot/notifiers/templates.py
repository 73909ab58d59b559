"""Filling notifier templates at send time, and the default Slack message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.net.secrets import SecretNotFound, SecretStore
from pipelines_schema.placeholders import MissingValue, render

_SECRET_PREFIX = "secrets."
_EVENT_PREFIX = "event."


class TemplateError(Exception):
    """A notifier template cannot be filled; sending it again will not help."""


class SecretsWithheld(LookupError):
    """An untrusted run asked for a secret."""


class Placeholders:
    """Values for `${...}` in a notifier: labels, `run.id`, `run.url`, `event.<field>`
    and, for trusted runs only, `secrets.NAME`."""

    def __init__(self, payload: Mapping[str, Any], secrets: SecretStore) -> None:
        self._labels: Mapping[str, Any] = payload.get("labels") or {}
        self._event: Mapping[str, Any] = payload.get("event") or {}
        self._run: Mapping[str, Any] = payload.get("run") or {}
        self._trusted = bool(payload.get("trusted"))
        self._secrets = secrets

    def fill(self, template: Any, notifier_name: str) -> Any:
        """Render `template`; raise `TemplateError` saying which placeholder failed."""
        try:
            return render(template, self.resolve)
        except SecretsWithheld as exc:
            raise TemplateError(
                f"notifier {notifier_name!r} uses ${{{exc}}}, but this run is untrusted "
                "(a pull request from a fork or by an author without write access), "
                "so it gets no secrets"
            ) from None
        except SecretNotFound as exc:
            raise TemplateError(f"notifier {notifier_name!r}: {exc}") from None
        except MissingValue as exc:
            raise TemplateError(
                f"notifier {notifier_name!r}: placeholder ${{{exc.name}}} has no value in this run"
            ) from None

    def resolve(self, name: str) -> str:
        if name.startswith(_SECRET_PREFIX):
            if not self._trusted:
                raise SecretsWithheld(name)
            return self._secrets.get(name.removeprefix(_SECRET_PREFIX))
        if name in ("run.id", "run.url") and self._run.get(name[4:]) is not None:
            return str(self._run[name[4:]])
        field = name.removeprefix(_EVENT_PREFIX)
        if name.startswith(_EVENT_PREFIX) and self._event.get(field) is not None:
            return str(self._event[field])
        label = name.removeprefix("labels.")
        if label in self._labels and self._labels[label] is not None:
            return _label_text(self._labels[label])
        raise MissingValue(name)


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_label_text(item) for item in value)
    return str(value)


def _slack_escape(text: str) -> str:
    # Slack parses &, < and > as control characters, so plain text must carry them as HTML
    # entities: https://api.slack.com/reference/surfaces/formatting#escaping
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _subject(event: Mapping[str, Any]) -> str:
    job = event.get("job", "")
    if event.get("scope") == "task":
        return f"task {event.get('task')} (step {event.get('step')}, job {job})"
    if event.get("scope") == "step":
        return f"step {event.get('step')} of job {job}"
    return f"job {job}"


def _happening(event: Mapping[str, Any]) -> str:
    name = str(event.get("name", ""))
    if name == "attempt_failed":
        return f"attempt {event.get('attempt')} failed"
    if name == "complete":
        return f"complete ({event.get('state')})"
    return name


def default_slack_text(payload: Mapping[str, Any], max_message_chars: int = 200) -> str:
    """Return a one-line summary such as
    `kubeci: job build failed on acme/web@abc1234 — https://ci.example.com/runs/7`."""
    event: Mapping[str, Any] = payload.get("event") or {}
    labels: Mapping[str, Any] = payload.get("labels") or {}
    run: Mapping[str, Any] = payload.get("run") or {}
    text = f"kubeci: {_subject(event)} {_happening(event)}"
    repository, sha = labels.get("repository"), labels.get("sha")
    if repository and sha:
        text += f" on {repository}@{str(sha)[:7]}"
    elif repository:
        text += f" on {repository}"
    message = str(event.get("message") or "")
    if message and event.get("name") in ("failed", "attempt_failed"):
        short = message if len(message) <= max_message_chars else message[:max_message_chars] + "…"
        text += f": {' '.join(short.split())}"
    text = _slack_escape(text)
    if run.get("url"):
        text += f" — {_slack_escape(str(run['url']))}"
    return text
