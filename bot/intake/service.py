"""The webhook intake of `kubeci serve`: from a signed request to committed runs.

`Intake.handle` takes one request's raw body and headers and returns the HTTP status
and JSON body to send back. The order of work:

1. Check that the forge's webhook secret is configured, then verify the signature or
   token over the raw bytes. Failures get 401 and store nothing.
2. Decode and classify the body (`bot.intake.github`, `bot.intake.gitlab`). A body
   that cannot be read gets 400 and stores nothing.
3. Respond `duplicate` to a delivery id that is already stored, before any forge I/O.
4. Act on the intent. A `start` reads `.kubeci.yml` (else `.kubeci.yaml`) at the
   trigger's SHA through the forge API, validates it, asks the trust policy, and then
   inserts the delivery row and creates the run in one transaction. The unique
   (forge, delivery_id) constraint makes a concurrent repeat of the same delivery
   create nothing.

A forge or database failure gets 503 and stores nothing, so that the forge's
redelivery of the same delivery id can succeed later. Every response names the
delivery id, event, action and outcome, and either the runs created or the reason
nothing started.

A start whose pipeline has no job whose rules match the trigger's labels creates no
run: the delivery is stored with the outcome `no_matching_jobs`, and the response lists
the pipeline's jobs. Commit statuses are reported per job, so such a run would show
nothing on the forge anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import asyncpg

from bot.config import ConfigError, Settings
from bot.engine.core import Engine, RunRequest
from bot.forges.clients import ForgeClients
from bot.forges.errors import ForgeAuthError, ForgeError, ForgeRateLimited
from bot.intake import github, gitlab
from bot.intake.events import (
    Delivery,
    Intent,
    NewComment,
    PayloadError,
    SignatureError,
    Trigger,
    normalise_headers,
)
from bot.store.db import Connection
from pipelines_schema.loader import PipelineError, Problem, load_pipeline
from pipelines_schema.models import Pipeline
from pipelines_schema.rules import matches

log = logging.getLogger(__name__)

PIPELINE_FILES: Final = (".kubeci.yml", ".kubeci.yaml")
# GitHub stops waiting for a webhook response after 10 s. All forge calls made for one
# delivery (the file read and the trust decision) share this budget, which leaves time
# for the database work.
FORGE_BUDGET_S: Final = 6.0
# Delivery ids and event names from unauthenticated requests are cut to this length in
# logs and responses.
UNTRUSTED_TEXT_MAX_CHARS: Final = 100

_SECRET_VARIABLES: Final = {
    "github": "KUBECI_GITHUB_WEBHOOK_SECRET",
    "gitlab": "KUBECI_GITLAB_WEBHOOK_SECRET",
}
_DELIVERY_HEADERS: Final = {
    "github": ("x-github-delivery",),
    "gitlab": ("x-gitlab-event-uuid", "idempotency-key"),
}
_EVENT_HEADERS: Final = {"github": "x-github-event", "gitlab": "x-gitlab-event"}
_KNOWN_EVENTS: Final = {"github": github.KNOWN_EVENTS, "gitlab": gitlab.KNOWN_EVENTS}
_DATABASE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# Valid pipeline files kept decoded, keyed by name and SHA-256 of the content. Most pushes
# leave the file unchanged, and validating it costs more than the rest of a delivery.
PIPELINE_CACHE_ENTRIES: Final = 64


async def read_pipeline_file(forges: ForgeClients, trigger: Trigger) -> tuple[str, bytes] | None:
    """Return the name and content of the pipeline file at the trigger's SHA, or None.

    Reads `.kubeci.yml`, else `.kubeci.yaml`, through the forge API. Raises ForgeError
    when the forge fails and ConfigError when it has no credentials.
    """
    for filename in PIPELINE_FILES:
        content = await _get_file(forges, trigger, filename)
        if content is not None:
            return filename, content
    return None


async def _get_file(forges: ForgeClients, trigger: Trigger, path: str) -> bytes | None:
    if trigger.forge == "github":
        client = forges.github()
        if trigger.installation_id is not None:
            client.remember_installation(trigger.repository, trigger.installation_id)
        return await client.get_file(trigger.repository, path, trigger.sha)
    project = trigger.project_id if trigger.project_id is not None else trigger.repository
    return await forges.gitlab().get_file(project, path, trigger.sha)


class PipelineCache:
    """A small LRU cache of `load_pipeline` results for valid files.

    Pipelines are frozen dataclasses, so one decoded pipeline can serve many runs.
    Invalid files are not cached: each delivery reports their problems afresh.
    """

    def __init__(self, max_entries: int = PIPELINE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, bytes], Pipeline] = OrderedDict()

    def load(self, content: bytes, filename: str) -> Pipeline:
        """Return the pipeline in `content`; raises PipelineError like `load_pipeline`."""
        key = (filename, hashlib.sha256(content).digest())
        pipeline = self._entries.get(key)
        if pipeline is not None:
            self._entries.move_to_end(key)
            return pipeline
        pipeline = load_pipeline(content, filename)
        self._entries[key] = pipeline
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return pipeline


@dataclass(frozen=True)
class IntakeResult:
    """The HTTP status and JSON body to send back for one delivery."""

    status: int
    body: dict[str, Any]

    @property
    def outcome(self) -> str:
        return str(self.body.get("outcome", "unknown"))


@dataclass(frozen=True)
class TrustDecision:
    """Whether a trigger may run now, and whether its run may use server secrets."""

    run: bool
    trusted: bool
    reason: str = ""


class TrustPolicy(Protocol):
    async def decide(self, trigger: Trigger) -> TrustDecision:
        """Decide whether `trigger` runs now; raising ForgeError gets the delivery a 503."""
        ...


@runtime_checkable
class LabelRemovalHandler(Protocol):
    """A trust policy that keeps approvals, which removing a label may revoke."""

    async def labels_removed(
        self,
        conn: Connection,
        *,
        forge: str,
        repository: str,
        pr_number: int,
        labels: tuple[str, ...],
    ) -> str | None:
        """Act on labels removed from a PR/MR, inside the transaction storing the delivery.

        Returns a note for the delivery's reason, or None when nothing changed.
        """
        ...


class TrustAll:
    """The trust policy that runs every trigger with the server's secrets."""

    async def decide(self, trigger: Trigger) -> TrustDecision:
        return TrustDecision(run=True, trusted=True, reason="every trigger is trusted")


class CommentHandler(Protocol):
    async def handle_comment(self, comment: NewComment, delivery_pk: int) -> dict[str, Any]:
        """Act on a stored comment; return fields to add to the response body."""
        ...


class ConfigErrorCallback(Protocol):
    async def __call__(
        self,
        conn: Connection,
        trigger: Trigger,
        problems: list[Problem],
        run_url: str | None,
    ) -> None:
        """Report an invalid pipeline file, inside the transaction that stores the delivery."""
        ...


class DeliveryMetrics(Protocol):
    """The part of `bot.web.metrics.Metrics` the intake uses."""

    @property
    def deliveries(self) -> Any: ...


class _AlreadyStored(Exception):
    """The delivery row exists: another request with the same delivery id committed first."""


@dataclass(frozen=True)
class _ForgeUnavailable(Exception):
    """A forge call needed to handle the delivery failed or ran out of time."""

    message: str


@dataclass
class _Reply:
    """The outcome of one delivery, before it becomes an IntakeResult."""

    delivery: Delivery
    outcome: str
    reason: str
    status: int = 200
    extra: dict[str, Any] = field(default_factory=dict)


def _clean_text(text: str) -> str:
    """Remove what Postgres text and jsonb reject: NUL characters and lone surrogates."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(str(key)): _clean_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean_json(item) for item in value]
    return value


def _header_text(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    return _clean_text(value[:UNTRUSTED_TEXT_MAX_CHARS])


def _group_base(trigger: Trigger) -> str:
    """Build the superseding key of a trigger's runs: its PR/MR, else its ref."""
    if trigger.pr_number is not None:
        return f"{trigger.forge}:{trigger.repository}#pr:{trigger.pr_number}"
    return f"{trigger.forge}:{trigger.repository}@{trigger.ref}"


def _forge_failure_message(what: str, exc: Exception, budget_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return (
            f"{what} took longer than {budget_s:g} s; the forge may be slow or down. "
            "Redeliver the webhook once the forge responds again"
        )
    if isinstance(exc, ConfigError):
        return f"{what} is not possible: {exc}"
    if isinstance(exc, ForgeRateLimited):
        return (
            f"{what} failed: {exc}. The forge's rate limit resets in "
            f"{exc.retry_after_s:.0f} s; redeliver the webhook after that"
        )
    if isinstance(exc, ForgeAuthError):
        return (
            f"{what} failed: {exc}. Check that KubeCI's token or GitHub App can read "
            "the repository's contents, then redeliver the webhook"
        )
    return f"{what} failed: {exc}. Redeliver the webhook once the forge responds again"


def configuration_warnings(settings: Settings) -> list[str]:
    """Return a warning for each forge whose webhook settings cannot work as set.

    A forge whose webhook secret is set without credentials gets 503 for every delivery
    that needs the forge API, and one with credentials but no secret gets 401 for every
    delivery. A forge with neither is not used, and gets no warning.
    """
    return [*_github_warnings(settings), *_gitlab_warnings(settings)]


def _github_warnings(settings: Settings) -> list[str]:
    warnings = []
    credentials = bool(settings.github_token or settings.github_app_id)
    if settings.github_webhook_secret and not credentials:
        warnings.append(
            "KUBECI_GITHUB_WEBHOOK_SECRET is set but no GitHub credentials are: GitHub "
            "pushes and pull requests get 503 until KUBECI_GITHUB_TOKEN, or "
            "KUBECI_GITHUB_APP_ID with KUBECI_GITHUB_PRIVATE_KEY_FILE, is set"
        )
    if credentials and not settings.github_webhook_secret:
        warnings.append(_secret_warning("KUBECI_GITHUB_WEBHOOK_SECRET", "GitHub"))
    if settings.github_app_id and not settings.github_private_key_file:
        warnings.append(
            "KUBECI_GITHUB_APP_ID is set but KUBECI_GITHUB_PRIVATE_KEY_FILE is not: every "
            "GitHub API call fails until it names the app's PEM private key"
        )
    if settings.github_app_id and settings.github_token:
        warnings.append(
            "both KUBECI_GITHUB_APP_ID and KUBECI_GITHUB_TOKEN are set: KubeCI uses the "
            "GitHub App and ignores the token"
        )
    return warnings


def _gitlab_warnings(settings: Settings) -> list[str]:
    if settings.gitlab_webhook_secret and not settings.gitlab_token:
        return [
            "KUBECI_GITLAB_WEBHOOK_SECRET is set but KUBECI_GITLAB_TOKEN is not: GitLab "
            "pushes and merge requests get 503 until it is set"
        ]
    if settings.gitlab_token and not settings.gitlab_webhook_secret:
        return [_secret_warning("KUBECI_GITLAB_WEBHOOK_SECRET", "GitLab")]
    return []


def _secret_warning(variable: str, forge: str) -> str:
    return f"{variable} is not set: every {forge} webhook is rejected with 401 until it is"


class Intake:
    """Turns webhook deliveries into stored deliveries and runs. Safe to share.

    `trust_policy`, `comment_handler` and `on_config_error` are public attributes, so
    that upper layers (chat-ops, reporting) can plug in after the services are built.
    When the trust policy is also a `LabelRemovalHandler`, the intake passes it the
    labels removed from a pull request, so that it can revoke approvals.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        engine: Engine,
        forges: ForgeClients,
        settings: Settings,
        metrics: DeliveryMetrics,
        *,
        trust_policy: TrustPolicy | None = None,
        comment_handler: CommentHandler | None = None,
        on_config_error: ConfigErrorCallback | None = None,
        forge_budget_s: float = FORGE_BUDGET_S,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.forges = forges
        self.settings = settings
        self.metrics = metrics
        self.trust_policy: TrustPolicy = trust_policy or TrustAll()
        self.comment_handler = comment_handler
        self.on_config_error = on_config_error
        self.forge_budget_s = forge_budget_s
        self.pipelines = PipelineCache()

    # ---- entry points -------------------------------------------------------------------

    async def handle(self, forge: str, body: bytes, headers: Mapping[str, str]) -> IntakeResult:
        """Authenticate, store and act on one webhook delivery; return the response.

        Raises nothing but cancellation. An unexpected error is logged and becomes a
        500, and its transaction is rolled back.
        """
        lowered = normalise_headers(headers)
        try:
            result = await self._handle(forge, body, lowered)
        except Exception:
            # The last line of defence: one bad delivery must not take the service down.
            log.exception(
                "webhook delivery failed unexpectedly; nothing was stored",
                extra=self._request_ids(forge, lowered),
            )
            result = self._request_error(
                forge, lowered, 500, "internal_error", "internal error; see the KubeCI log"
            )
        self._count(forge, result, lowered)
        return result

    def too_large(self, forge: str, headers: Mapping[str, str], limit_bytes: int) -> IntakeResult:
        """Return (and log and count) the 413 response for a body over `limit_bytes`."""
        lowered = normalise_headers(headers)
        message = (
            f"request body is larger than {limit_bytes} bytes; raise KUBECI_MAX_BODY_BYTES "
            "if the forge legitimately sends more"
        )
        log.warning("webhook rejected: %s", message, extra=self._request_ids(forge, lowered))
        result = self._request_error(forge, lowered, 413, "too_large", message)
        self._count(forge, result, lowered)
        return result

    # ---- steps before any storage -------------------------------------------------------

    async def _handle(self, forge: str, body: bytes, headers: dict[str, str]) -> IntakeResult:
        if forge not in _SECRET_VARIABLES:
            message = (
                f"unknown forge {forge!r}; send webhooks to /webhooks/github or /webhooks/gitlab"
            )
            return self._request_error(forge, headers, 404, "unknown_forge", message)
        secret = self.settings.github_webhook_secret
        if forge == "gitlab":
            secret = self.settings.gitlab_webhook_secret
        if not secret:
            return self._secret_missing(forge, headers)
        try:
            delivery = self._parse_delivery(forge, body, headers, secret)
        except SignatureError as exc:
            log.warning("webhook rejected: %s", exc, extra=self._request_ids(forge, headers))
            return self._request_error(forge, headers, 401, "unauthorized", str(exc))
        except PayloadError as exc:
            return self._invalid_payload(forge, headers, exc)
        try:
            return await self._handle_delivery(delivery)
        except PayloadError as exc:
            return self._invalid_payload(forge, headers, exc)
        except _DATABASE_ERRORS as exc:
            return self._database_unavailable(delivery, exc)

    def _parse_delivery(
        self, forge: str, body: bytes, headers: dict[str, str], secret: str
    ) -> Delivery:
        if forge == "github":
            return github.parse_delivery(body, headers, secret=secret)
        return gitlab.parse_delivery(body, headers, secret=secret)

    def _classify(self, delivery: Delivery) -> Intent:
        if delivery.forge == "github":
            logins = (self.settings.github_bot_login,) if self.settings.github_bot_login else ()
            return github.classify(delivery, bot_logins=logins)
        return gitlab.classify(delivery)

    async def _handle_delivery(self, delivery: Delivery) -> IntakeResult:
        # The fast check spares the forge calls; the unique constraint decides for good.
        if await self._is_stored(delivery):
            return self._result(self._duplicate(delivery))
        intent = self._classify(delivery)
        try:
            reply = await self._act(delivery, intent)
        except _AlreadyStored:
            reply = self._duplicate(delivery)
        except _ForgeUnavailable as exc:
            reply = _Reply(delivery, "forge_unavailable", exc.message, status=503)
        return self._result(reply)

    async def _is_stored(self, delivery: Delivery) -> bool:
        found = await self.pool.fetchval(
            "SELECT 1 FROM deliveries WHERE forge = $1 AND delivery_id = $2",
            delivery.forge,
            _clean_text(delivery.delivery_id),
        )
        return found is not None

    def _act(self, delivery: Delivery, intent: Intent) -> Awaitable[_Reply]:
        actions: dict[str, Callable[[Delivery, Intent], Awaitable[_Reply]]] = {
            "ping": self._on_ping,
            "ignore": self._on_ignore,
            "start": self._on_start,
            "cancel_ref": self._on_cancel_ref,
            "cancel_pr": self._on_cancel_pr,
            "comment": self._on_comment,
        }
        return actions[intent.kind](delivery, intent)

    # ---- intents ------------------------------------------------------------------------

    async def _on_ping(self, delivery: Delivery, intent: Intent) -> _Reply:
        await self._store(delivery, "pong", intent.reason)
        return _Reply(delivery, "pong", intent.reason)

    async def _on_ignore(self, delivery: Delivery, intent: Intent) -> _Reply:
        if intent.labels_removed and isinstance(self.trust_policy, LabelRemovalHandler):
            return await self._on_labels_removed(delivery, intent, self.trust_policy)
        await self._store(delivery, "ignored", intent.reason)
        return _Reply(delivery, "ignored", intent.reason)

    async def _on_labels_removed(
        self, delivery: Delivery, intent: Intent, handler: LabelRemovalHandler
    ) -> _Reply:
        """Let the trust policy revoke approvals, in one transaction with the delivery.

        A repeated delivery rolls the handler's changes back with its own.
        """
        assert intent.repository is not None and intent.pr_number is not None
        reason = intent.reason
        async with self.pool.acquire() as conn, conn.transaction():
            note = await handler.labels_removed(
                conn,
                forge=delivery.forge,
                repository=intent.repository,
                pr_number=intent.pr_number,
                labels=intent.labels_removed,
            )
            if note is not None:
                reason = f"{reason}; {note}"
            await self._insert(conn, delivery, "ignored", reason)
        return _Reply(delivery, "ignored", reason)

    async def _on_start(self, delivery: Delivery, intent: Intent) -> _Reply:
        trigger = intent.trigger
        assert trigger is not None, "a start intent carries its trigger"
        deadline = asyncio.get_running_loop().time() + self.forge_budget_s
        found = await self._read_pipeline_file(trigger, deadline)
        if found is None:
            reason = f"no {' or '.join(PIPELINE_FILES)} at {trigger.sha}: nothing to run"
            await self._store(delivery, "no_pipeline", reason)
            return _Reply(delivery, "no_pipeline", reason)
        filename, content = found
        try:
            pipeline = self.pipelines.load(content, filename)
        except PipelineError as exc:
            return await self._reject_pipeline(delivery, trigger, exc.problems)
        labels = trigger.labels()
        if not any(matches(job.rules, labels) for job in pipeline.jobs):
            return await self._no_matching_jobs(delivery, intent, pipeline)
        decision = await self._decide_trust(trigger, deadline)
        if not decision.run:
            await self._store(delivery, "awaiting_approval", decision.reason, keep_payload=True)
            return _Reply(delivery, "awaiting_approval", decision.reason)
        return await self._start_run(delivery, intent, trigger, pipeline, decision)

    async def _read_pipeline_file(
        self, trigger: Trigger, deadline: float
    ) -> tuple[str, bytes] | None:
        """Return the name and content of the trigger's pipeline file, or None if absent.

        Raises _ForgeUnavailable when the forge fails or the budget runs out.
        """
        try:
            async with asyncio.timeout_at(deadline):
                return await read_pipeline_file(self.forges, trigger)
        except (ForgeError, ConfigError, TimeoutError) as exc:
            what = f"reading {PIPELINE_FILES[0]} of {trigger.repository} at {trigger.sha}"
            raise _ForgeUnavailable(_forge_failure_message(what, exc, self.forge_budget_s)) from exc

    async def _decide_trust(self, trigger: Trigger, deadline: float) -> TrustDecision:
        try:
            async with asyncio.timeout_at(deadline):
                return await self.trust_policy.decide(trigger)
        except (ForgeError, ConfigError, TimeoutError) as exc:
            what = f"checking whether {trigger.author or 'the author'} may run pipelines"
            raise _ForgeUnavailable(_forge_failure_message(what, exc, self.forge_budget_s)) from exc

    async def _reject_pipeline(
        self, delivery: Delivery, trigger: Trigger, problems: list[Problem]
    ) -> _Reply:
        first = problems[0].format() if problems else "invalid pipeline file"
        count = f"{len(problems)} problem{'' if len(problems) == 1 else 's'}"
        reason = f"invalid pipeline file, {count}; the first: {first}"
        async with self.pool.acquire() as conn, conn.transaction():
            await self._insert(conn, delivery, "invalid_pipeline", reason)
            if self.on_config_error is not None:
                await self.on_config_error(conn, trigger, problems, None)
        problem_list = [problem.to_dict() for problem in problems]
        return _Reply(delivery, "invalid_pipeline", reason, extra={"problems": problem_list})

    async def _no_matching_jobs(
        self, delivery: Delivery, intent: Intent, pipeline: Pipeline
    ) -> _Reply:
        names = ", ".join(job.name for job in pipeline.jobs)
        reason = f"{intent.reason}, but no job's rules match its labels (jobs: {names})"
        await self._store(delivery, "no_matching_jobs", reason)
        return _Reply(delivery, "no_matching_jobs", reason)

    async def _start_run(
        self,
        delivery: Delivery,
        intent: Intent,
        trigger: Trigger,
        pipeline: Pipeline,
        decision: TrustDecision,
    ) -> _Reply:
        async with self.pool.acquire() as conn, conn.transaction():
            delivery_pk = await self._insert(conn, delivery, "started", intent.reason)
            request = RunRequest(
                pipeline=pipeline,
                labels=dict(trigger.labels()),
                forge=trigger.forge,
                repository=trigger.repository,
                sha=trigger.sha,
                ref=trigger.ref,
                pr_number=trigger.pr_number,
                trusted=decision.trusted,
                source=trigger.source(),
                delivery_pk=delivery_pk,
                group_base=_group_base(trigger),
            )
            run_id = await self.engine.create_run(conn, request)
        runs = [{"id": run_id, "url": self.engine.run_url(run_id)}]
        return _Reply(delivery, "started", intent.reason, extra={"runs": runs})

    async def _on_cancel_ref(self, delivery: Delivery, intent: Intent) -> _Reply:
        assert intent.repository is not None and intent.ref is not None
        query = (
            "SELECT id FROM runs WHERE forge = $1 AND repository = $2 AND ref = $3"
            " AND state = 'running' ORDER BY id"
        )
        return await self._cancel(delivery, intent, query, intent.repository, intent.ref)

    async def _on_cancel_pr(self, delivery: Delivery, intent: Intent) -> _Reply:
        assert intent.repository is not None and intent.pr_number is not None
        query = (
            "SELECT id FROM runs WHERE forge = $1 AND repository = $2 AND pr_number = $3"
            " AND state = 'running' ORDER BY id"
        )
        return await self._cancel(delivery, intent, query, intent.repository, intent.pr_number)

    async def _cancel(self, delivery: Delivery, intent: Intent, query: str, *args: Any) -> _Reply:
        """Cancel the active runs that `query` selects, in one transaction with the delivery."""
        async with self.pool.acquire() as conn, conn.transaction():
            delivery_pk = await self._insert(conn, delivery, "cancelled", intent.reason)
            cancelled = []
            for row in await conn.fetch(query, delivery.forge, *args):
                if await self.engine.cancel_run(conn, row["id"], reason=intent.reason):
                    cancelled.append(int(row["id"]))
            outcome = "cancelled" if cancelled else "nothing_to_cancel"
            if not cancelled:
                await conn.execute(
                    "UPDATE deliveries SET outcome = $2 WHERE id = $1", delivery_pk, outcome
                )
        return _Reply(delivery, outcome, intent.reason, extra={"cancelled_runs": cancelled})

    async def _on_comment(self, delivery: Delivery, intent: Intent) -> _Reply:
        comment = intent.comment
        assert comment is not None, "a comment intent carries its comment"
        delivery_pk = await self._store(
            delivery, "comment_stored", intent.reason, keep_payload=True
        )
        reply = _Reply(delivery, "comment_stored", intent.reason)
        if self.comment_handler is None:
            return reply
        # The comment is committed before the handler runs, so a failing handler leaves
        # it stored, and a redelivery of the same id is a duplicate.
        try:
            reply.extra = await self.comment_handler.handle_comment(comment, delivery_pk)
        except (ForgeError, ConfigError, *_DATABASE_ERRORS) as exc:
            log.error(
                "comment handler failed: %s; the comment is stored but was not acted on",
                exc,
                extra=self._delivery_ids(delivery),
            )
            reply.extra = {"error": f"the comment is stored but was not acted on: {exc}"}
        return reply

    # ---- storage ------------------------------------------------------------------------

    async def _store(
        self, delivery: Delivery, outcome: str, reason: str, *, keep_payload: bool = False
    ) -> int:
        # One statement commits on its own; an explicit transaction would add two round trips.
        async with self.pool.acquire() as conn:
            return await self._insert(conn, delivery, outcome, reason, keep_payload=keep_payload)

    async def _insert(
        self,
        conn: Connection,
        delivery: Delivery,
        outcome: str,
        reason: str,
        *,
        keep_payload: bool = False,
    ) -> int:
        """Insert the delivery row; raise _AlreadyStored when its id is taken.

        A concurrent insert of the same id waits here until the other transaction ends.
        """
        delivery_pk = await conn.fetchval(
            "INSERT INTO deliveries (forge, delivery_id, event, action, repository, outcome,"
            " reason, payload) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (forge, delivery_id) DO NOTHING RETURNING id",
            delivery.forge,
            _clean_text(delivery.delivery_id),
            _clean_text(delivery.event_name),
            _clean_text(delivery.action) if delivery.action is not None else None,
            _clean_text(delivery.repository) if delivery.repository is not None else None,
            outcome,
            _clean_text(reason),
            _clean_json(dict(delivery.payload)) if keep_payload else None,
        )
        if delivery_pk is None:
            raise _AlreadyStored
        return int(delivery_pk)

    # ---- responses, logs and metrics ----------------------------------------------------

    def _duplicate(self, delivery: Delivery) -> _Reply:
        reason = f"delivery {delivery.delivery_id} was already received; nothing was done again"
        return _Reply(delivery, "duplicate", reason)

    def _result(self, reply: _Reply) -> IntakeResult:
        delivery = reply.delivery
        body: dict[str, Any] = {
            "delivery_id": delivery.delivery_id,
            "forge": delivery.forge,
            "event": delivery.event_name,
            "action": delivery.action,
            "repository": delivery.repository,
            "outcome": reply.outcome,
            "reason": reply.reason,
            "runs": [],
        }
        if reply.status >= 400:
            body["error"] = reply.reason
        body.update(reply.extra)
        ids = self._delivery_ids(delivery)
        run_ids = [run["id"] for run in body["runs"]]
        if run_ids:
            ids["run_id"] = run_ids[0] if len(run_ids) == 1 else run_ids
        level = logging.ERROR if reply.status >= 500 else logging.INFO
        log.log(
            level,
            "delivery %s %s: %s (%s)",
            delivery.event_name,
            delivery.action or "-",
            reply.outcome,
            reply.reason,
            extra=ids,
        )
        return IntakeResult(reply.status, body)

    def _secret_missing(self, forge: str, headers: dict[str, str]) -> IntakeResult:
        variable = _SECRET_VARIABLES[forge]
        message = (
            f"{variable} is not set, and KubeCI accepts no unsigned {forge} webhooks; "
            f"set {variable} to the secret configured on the {forge} webhook"
        )
        log.error("webhook rejected: %s", message, extra=self._request_ids(forge, headers))
        return self._request_error(forge, headers, 401, "secret_not_configured", message)

    def _invalid_payload(
        self, forge: str, headers: dict[str, str], exc: PayloadError
    ) -> IntakeResult:
        log.warning(
            "webhook rejected, nothing stored: %s",
            exc,
            extra=self._request_ids(forge, headers),
        )
        result = self._request_error(forge, headers, 400, "invalid_payload", str(exc))
        result.body["field"] = exc.field
        return result

    def _database_unavailable(self, delivery: Delivery, exc: Exception) -> IntakeResult:
        message = (
            f"the database failed ({type(exc).__name__}: {exc}); nothing was stored. "
            "Check DATABASE_URL and the database server, then redeliver the webhook"
        )
        return self._result(_Reply(delivery, "database_unavailable", message, status=503))

    def _request_error(
        self, forge: str, headers: Mapping[str, str], status: int, outcome: str, message: str
    ) -> IntakeResult:
        """Build the response for a request that was rejected before it became a Delivery."""
        body = {
            "delivery_id": self._untrusted_delivery_id(forge, headers),
            "forge": forge,
            "event": _header_text(headers, _EVENT_HEADERS.get(forge, "")),
            "outcome": outcome,
            "error": message,
        }
        return IntakeResult(status, body)

    def _count(self, forge: str, result: IntakeResult, headers: Mapping[str, str]) -> None:
        # Only authenticated requests may name the event, and only with a name the forge
        # documents, because the event header is not signed and every new label value
        # is a new time series.
        event = str(result.body.get("event") or "")
        if result.status in (401, 404, 413) or not event:
            event = "unknown"
        elif event not in _KNOWN_EVENTS.get(forge, frozenset()):
            event = "other"
        forge_label = forge if forge in _SECRET_VARIABLES else "unknown"
        self.metrics.deliveries.labels(forge_label, event, result.outcome).inc()

    @staticmethod
    def _untrusted_delivery_id(forge: str, headers: Mapping[str, str]) -> str:
        for name in _DELIVERY_HEADERS.get(forge, ()):
            value = _header_text(headers, name)
            if value:
                return value
        return "unknown"

    def _request_ids(self, forge: str, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"forge": forge, "delivery_id": self._untrusted_delivery_id(forge, headers)}

    @staticmethod
    def _delivery_ids(delivery: Delivery) -> dict[str, Any]:
        ids: dict[str, Any] = {"forge": delivery.forge, "delivery_id": delivery.delivery_id}
        if delivery.repository is not None:
            ids["repository"] = delivery.repository
        return ids
