"""GitHub webhook parsing: bytes and headers in, a `Delivery` and an `Intent` out.

No I/O happens here. The signature is checked before the body is decoded.
Payload shapes: https://docs.github.com/en/webhooks/webhook-events-and-payloads
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Mapping

from bot.intake.events import (
    ZERO_SHA,
    Delivery,
    Fields,
    Intent,
    NewComment,
    PayloadError,
    SignatureError,
    Trigger,
    check_ref,
    check_repository_name,
    decode_body,
    delivery_id_header,
    normalise_headers,
    ref_name,
)

# The X-GitHub-Event names GitHub documents. Metrics count other names as `other`, so
# that a signed request cannot add labels without limit; add new events here.
KNOWN_EVENTS = frozenset(
    {
        "branch_protection_configuration",
        "branch_protection_rule",
        "check_run",
        "check_suite",
        "code_scanning_alert",
        "commit_comment",
        "create",
        "custom_property",
        "custom_property_values",
        "delete",
        "dependabot_alert",
        "deploy_key",
        "deployment",
        "deployment_protection_rule",
        "deployment_review",
        "deployment_status",
        "discussion",
        "discussion_comment",
        "fork",
        "github_app_authorization",
        "gollum",
        "installation",
        "installation_repositories",
        "installation_target",
        "issue_comment",
        "issues",
        "label",
        "marketplace_purchase",
        "member",
        "membership",
        "merge_group",
        "meta",
        "milestone",
        "org_block",
        "organization",
        "package",
        "page_build",
        "personal_access_token_request",
        "ping",
        "project",
        "project_card",
        "project_column",
        "projects_v2",
        "projects_v2_item",
        "public",
        "pull_request",
        "pull_request_review",
        "pull_request_review_comment",
        "pull_request_review_thread",
        "push",
        "registry_package",
        "release",
        "repository",
        "repository_advisory",
        "repository_dispatch",
        "repository_import",
        "repository_ruleset",
        "repository_vulnerability_alert",
        "secret_scanning_alert",
        "secret_scanning_alert_location",
        "security_advisory",
        "security_and_analysis",
        "sponsorship",
        "star",
        "status",
        "team",
        "team_add",
        "watch",
        "workflow_dispatch",
        "workflow_job",
        "workflow_run",
    }
)

_PR_START_WORDS = {
    "opened": "opened",
    "synchronize": "updated with new commits",
    "reopened": "reopened",
    "ready_for_review": "marked ready for review",
}
PR_START_ACTIONS = frozenset(_PR_START_WORDS)

_PR_IGNORE_REASONS = {
    "edited": "pull request edited (title, body or base): no new commits",
    "converted_to_draft": "pull request converted to draft",
    "assigned": "pull request assigned",
    "unassigned": "pull request unassigned",
    "review_requested": "review requested",
    "review_request_removed": "review request removed",
}


def verify_signature(body: bytes, headers: Mapping[str, str], secret: str) -> None:
    """Check `X-Hub-Signature-256`, an HMAC-SHA256 of the raw body keyed with `secret`.

    An empty `secret` means no secret is configured, and nothing is checked.
    `headers` must have lower-case names. Raises SignatureError when the header is
    missing, uses SHA-1 only, or does not match.
    https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
    """
    if not secret:
        return
    signature = headers.get("x-hub-signature-256")
    if signature is None:
        if "x-hub-signature" in headers:
            raise SignatureError(
                "X-Hub-Signature-256 is missing and the SHA-1 X-Hub-Signature is not "
                "accepted; GitHub sends both when the webhook has a secret"
            )
        raise SignatureError(
            "X-Hub-Signature-256 is missing; set the same secret on the GitHub webhook "
            "and in KUBECI_GITHUB_WEBHOOK_SECRET"
        )
    algorithm, _, digest = signature.strip().partition("=")
    if algorithm != "sha256" or not digest:
        raise SignatureError("X-Hub-Signature-256 is not of the form sha256=<hex digest>")
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    given = digest.lower().encode("utf-8", errors="replace")
    if not hmac.compare_digest(expected.encode("ascii"), given):
        raise SignatureError(
            "X-Hub-Signature-256 does not match the body; check that the webhook secret "
            "equals KUBECI_GITHUB_WEBHOOK_SECRET"
        )


def parse_delivery(body: bytes, headers: Mapping[str, str], *, secret: str) -> Delivery:
    """Authenticate and decode one GitHub webhook request.

    Raises SignatureError before reading the body when authentication fails, and
    PayloadError when the event header is missing, the delivery id header is too long,
    or the body is not a JSON object.
    """
    lowered = normalise_headers(headers)
    verify_signature(body, lowered, secret)
    event_name = lowered.get("x-github-event", "").strip()
    if not event_name:
        raise PayloadError("header X-GitHub-Event", "is missing")
    payload = decode_body(body, lowered.get("content-type"))
    delivery_id = delivery_id_header(lowered, "X-GitHub-Delivery")
    if not delivery_id:
        delivery_id = "sha256:" + hashlib.sha256(body).hexdigest()
    fields = Fields(payload)
    repository = fields.optional_child("repository")
    target_type = lowered.get("x-github-hook-installation-target-type")
    target_id = lowered.get("x-github-hook-installation-target-id")
    return Delivery(
        forge="github",
        delivery_id=delivery_id,
        event_name=event_name,
        action=fields.optional_text("action"),
        repository=_optional_full_name(repository),
        payload=payload,
        hook_target=f"{target_type}:{target_id}" if target_type and target_id else None,
    )


def classify(delivery: Delivery, *, bot_logins: Collection[str] = ()) -> Intent:
    """Classify a GitHub delivery into the Intent the service acts on.

    `bot_logins` are logins whose comments count as a bot's (KubeCI's own account, for
    instance), besides accounts GitHub marks as bots. Raises PayloadError naming the
    first missing or mistyped field.
    """
    fields = Fields(delivery.payload)
    if delivery.event_name == "issue_comment":
        return _classify_comment(fields, bot_logins)
    handler = _HANDLERS.get(delivery.event_name)
    if handler is None:
        return Intent(
            "ignore",
            f"unsupported event {delivery.event_name}",
            repository=delivery.repository,
        )
    return handler(fields)


def parse(
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str,
    bot_logins: Collection[str] = (),
) -> tuple[Delivery, Intent]:
    """Authenticate, decode and classify one GitHub webhook request."""
    delivery = parse_delivery(body, headers, secret=secret)
    return delivery, classify(delivery, bot_logins=bot_logins)


def _full_name(repo: Fields) -> str:
    name = repo.text("full_name")
    return check_repository_name(name, repo.where("full_name"), form="owner/name", max_segments=2)


def _optional_full_name(repo: Fields | None) -> str | None:
    if repo is None or repo.optional_text("full_name") is None:
        return None
    return _full_name(repo)


def _repository_name(fields: Fields) -> str:
    return _full_name(fields.child("repository"))


def _installation_id(fields: Fields) -> int | None:
    installation = fields.optional_child("installation")
    return installation.optional_integer("id") if installation else None


def _classify_ping(fields: Fields) -> Intent:
    hook_id = fields.optional_integer("hook_id")
    zen = fields.optional_text("zen") or ""
    return Intent(
        "ping",
        f"ping from hook {hook_id}: {zen}".rstrip(": "),
        repository=_optional_full_name(fields.optional_child("repository")),
    )


def _classify_push(fields: Fields) -> Intent:
    ref = check_ref(fields.text("ref"), fields.where("ref"))
    after = fields.text("after")
    before = fields.optional_text("before")
    repository = _repository_name(fields)
    kind, name = ref_name(ref)
    if kind is None:
        return Intent("ignore", f"push to {ref}, which is neither a branch nor a tag", repository)
    if fields.flag("deleted", default=False) or after == ZERO_SHA:
        return Intent("cancel_ref", f"{kind} {name} deleted", repository, ref=ref)

    sender = fields.optional_child("sender")
    pusher = fields.optional_child("pusher")
    author = (sender.optional_text("login") if sender else None) or (
        pusher.optional_text("name") if pusher else None
    )
    trigger = Trigger(
        forge="github",
        event="tag" if kind == "tag" else "push",
        repository=repository,
        sha=fields.commit_id("after"),
        ref=ref,
        branch=name if kind == "branch" else None,
        tag=name if kind == "tag" else None,
        author=author or "",
        author_id=sender.optional_integer("id") if sender else None,
        head_repository=repository,
        before_sha=None if before in (None, ZERO_SHA) else before,
        installation_id=_installation_id(fields),
    )
    return Intent("start", _push_reason(fields, kind, name, before), repository, trigger=trigger)


def _push_reason(fields: Fields, kind: str, name: str, before: str | None) -> str:
    if before == ZERO_SHA or fields.flag("created", default=False):
        return f"{kind} {name} created"
    if fields.flag("forced", default=False):
        return f"forced push to {kind} {name}"
    return f"push to {kind} {name}"


def _repository_identity(repo: Fields) -> object:
    # Ids survive renames, so compare them, and fall back to the name when one is absent.
    repo_id = repo.optional_integer("id")
    return repo_id if repo_id is not None else repo.text("full_name")


def _pr_trigger(fields: Fields, pr: Fields, number: int) -> Trigger:
    head = pr.child("head")
    base = pr.child("base")
    head_repo = head.optional_child("repo")
    base_repo = base.child("repo")
    # A null head repository means the fork was deleted: treat it as a fork.
    fork = head_repo is None or _repository_identity(head_repo) != _repository_identity(base_repo)
    user = pr.child("user")
    return Trigger(
        forge="github",
        event="pull_request",
        repository=_repository_name(fields),
        sha=head.commit_id("sha"),
        ref=f"refs/pull/{number}/head",
        pr_number=number,
        source_branch=head.text("ref"),
        target_branch=base.text("ref"),
        pr_labels=tuple(label.text("name") for label in pr.child_list("labels")),
        author=user.text("login"),
        author_id=user.optional_integer("id"),
        fork=fork,
        head_repository=_full_name(head_repo) if head_repo else None,
        draft=pr.flag("draft", default=False),
        installation_id=_installation_id(fields),
    )


def _classify_pull_request(fields: Fields) -> Intent:
    action = fields.text("action")
    pr = fields.child("pull_request")
    number = pr.integer("number")
    repository = _repository_name(fields)
    if action in PR_START_ACTIONS:
        trigger = _pr_trigger(fields, pr, number)
        draft = " (draft)" if trigger.draft else ""
        reason = f"pull request #{number} {_PR_START_WORDS[action]}{draft}"
        return Intent("start", reason, repository, trigger=trigger, pr_number=number)
    if action == "closed":
        how = "merged" if pr.flag("merged", default=False) else "closed without merging"
        return Intent("cancel_pr", f"pull request #{number} {how}", repository, pr_number=number)
    if action in ("labeled", "unlabeled"):
        label = fields.child("label").text("name")
        added = (label,) if action == "labeled" else ()
        removed = (label,) if action == "unlabeled" else ()
        return Intent(
            "ignore",
            f"label change only: {label} {'added' if added else 'removed'}",
            repository,
            pr_number=number,
            labels_added=added,
            labels_removed=removed,
        )
    reason = _PR_IGNORE_REASONS.get(action, f"pull request action {action} starts nothing")
    return Intent("ignore", reason, repository, pr_number=number)


def _is_bot(user: Fields, login: str, bot_logins: Collection[str]) -> bool:
    if user.optional_text("type") == "Bot" or login.endswith("[bot]"):
        return True
    return login.lower() in {name.lower() for name in bot_logins}


def _classify_comment(fields: Fields, bot_logins: Collection[str]) -> Intent:
    action = fields.text("action")
    issue = fields.child("issue")
    repository = _repository_name(fields)
    if issue.optional_child("pull_request") is None:
        return Intent("ignore", "comment on a plain issue", repository)
    number = issue.integer("number")
    if action != "created":
        return Intent("ignore", f"{action} comment", repository, pr_number=number)

    comment = fields.child("comment")
    user = comment.child("user")
    login = user.text("login")
    new_comment = NewComment(
        forge="github",
        repository=repository,
        pr_number=number,
        comment_id=comment.integer("id"),
        author=login,
        author_id=user.optional_integer("id"),
        author_is_bot=_is_bot(user, login, bot_logins),
        body=comment.optional_text("body") or "",
        author_association=comment.optional_text("author_association"),
        installation_id=_installation_id(fields),
    )
    return Intent(
        "comment",
        f"comment {new_comment.comment_id} by {login} on pull request #{number}",
        repository,
        comment=new_comment,
        pr_number=number,
    )


def _ignore_with(reason: str) -> Callable[[Fields], Intent]:
    def classify_ignored(fields: Fields) -> Intent:
        name = _optional_full_name(fields.optional_child("repository"))
        action = fields.optional_text("action")
        return Intent("ignore", f"{reason} ({action})" if action else reason, name)

    return classify_ignored


_HANDLERS: dict[str, Callable[[Fields], Intent]] = {
    "ping": _classify_ping,
    "push": _classify_push,
    "pull_request": _classify_pull_request,
    "create": _ignore_with("create event: the push event starts the run"),
    "delete": _ignore_with("delete event: the push event cancels the runs"),
    "pull_request_review": _ignore_with("unsupported event pull_request_review"),
    "pull_request_review_comment": _ignore_with("unsupported event pull_request_review_comment"),
    "check_suite": _ignore_with("unsupported event check_suite"),
    "check_run": _ignore_with("unsupported event check_run"),
    "installation": _ignore_with("GitHub App installation event: nothing to run"),
    "installation_repositories": _ignore_with("GitHub App installation event: nothing to run"),
}
