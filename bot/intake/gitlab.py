"""GitLab webhook parsing: bytes and headers in, a `Delivery` and an `Intent` out.

No I/O happens here. GitLab sends the configured secret in plain text in
`X-Gitlab-Token`, and the parser compares it in constant time before decoding the body.
Payload shapes: https://docs.gitlab.com/ee/user/project/integrations/webhook_events.html
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping

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
    decode_json_object,
    delivery_id_header,
    normalise_headers,
    ref_name,
)

# The X-Gitlab-Event names GitLab documents, and the object_kind values that name the
# event when the header is absent. Metrics count other names as `other`, so that an
# authenticated request cannot add labels without limit; add new events here.
KNOWN_EVENTS = frozenset(
    {
        "Push Hook",
        "Tag Push Hook",
        "Issue Hook",
        "Confidential Issue Hook",
        "Note Hook",
        "Confidential Note Hook",
        "Merge Request Hook",
        "Wiki Page Hook",
        "Pipeline Hook",
        "Job Hook",
        "Deployment Hook",
        "Feature Flag Hook",
        "Release Hook",
        "Emoji Hook",
        "Resource Access Token Hook",
        "Member Hook",
        "Subgroup Hook",
        "Project Hook",
        "Vulnerability Hook",
        "System Hook",
        "push",
        "tag_push",
        "issue",
        "note",
        "merge_request",
        "wiki_page",
        "pipeline",
        "build",
        "deployment",
        "feature_flag",
        "release",
        "emoji",
        "access_token",
        "vulnerability",
    }
)

MR_START_ACTIONS = frozenset({"open", "reopen"})
MR_CANCEL_ACTIONS = frozenset({"close", "merge"})

# Users GitLab creates for project and group access tokens, such as
# project_42_bot or project_42_bot_0a1b2c (GitLab 14.x and later add the suffix).
_TOKEN_BOT_USERNAME = re.compile(r"(project|group)_\d+_bot(_[0-9a-z]+)?")


def verify_token(headers: Mapping[str, str], secret: str) -> None:
    """Compare `X-Gitlab-Token` with `secret` in constant time.

    An empty `secret` means no secret is configured, and nothing is checked.
    `headers` must have lower-case names. Raises SignatureError on a missing or
    different token.
    """
    if not secret:
        return
    token = headers.get("x-gitlab-token")
    if token is None:
        raise SignatureError(
            "X-Gitlab-Token is missing; set the webhook's secret token to the value of "
            "KUBECI_GITLAB_WEBHOOK_SECRET"
        )
    given = token.encode("utf-8", errors="replace")
    if not hmac.compare_digest(given, secret.encode("utf-8")):
        raise SignatureError(
            "X-Gitlab-Token does not match; check the webhook's secret token against "
            "KUBECI_GITLAB_WEBHOOK_SECRET"
        )


def delivery_id_from(headers: Mapping[str, str], body: bytes) -> str:
    """Pick the id that identifies a delivery across GitLab's retries.

    In order: `X-Gitlab-Event-UUID`; `X-Gitlab-Webhook-UUID` with `Idempotency-Key`;
    else the SHA-256 of the body. `headers` must have lower-case names. Raises
    PayloadError when one of these headers is too long.
    """
    event_uuid = delivery_id_header(headers, "X-Gitlab-Event-UUID")
    if event_uuid:
        return event_uuid
    idempotency_key = delivery_id_header(headers, "Idempotency-Key")
    if idempotency_key:
        webhook_uuid = delivery_id_header(headers, "X-Gitlab-Webhook-UUID")
        return f"{webhook_uuid}:{idempotency_key}" if webhook_uuid else idempotency_key
    return "sha256:" + hashlib.sha256(body).hexdigest()


def parse_delivery(body: bytes, headers: Mapping[str, str], *, secret: str) -> Delivery:
    """Authenticate and decode one GitLab webhook request.

    Raises SignatureError before reading the body when authentication fails, and
    PayloadError when the body is not a JSON object, or when neither the
    `X-Gitlab-Event` header nor the body's `object_kind` or `event_name` names the event.
    """
    lowered = normalise_headers(headers)
    verify_token(lowered, secret)
    media_type = lowered.get("content-type", "application/json").split(";")[0].strip()
    if media_type.lower() != "application/json":
        raise PayloadError("header Content-Type", f"is {media_type!r}; GitLab sends JSON")
    payload = decode_json_object(body)
    fields = Fields(payload)
    # Member and subgroup hooks have no object_kind, only an event_name.
    event_name = (
        lowered.get("x-gitlab-event", "").strip()
        or fields.optional_text("object_kind")
        or fields.optional_text("event_name")
    )
    if not event_name:
        raise PayloadError(
            "header X-Gitlab-Event", "is missing, and the body has no object_kind or event_name"
        )
    attributes = fields.optional_child("object_attributes")
    project = fields.optional_child("project")
    return Delivery(
        forge="gitlab",
        delivery_id=delivery_id_from(lowered, body),
        event_name=event_name,
        action=attributes.optional_text("action") if attributes else None,
        repository=_optional_path(project),
        payload=payload,
        hook_target=lowered.get("x-gitlab-instance"),
    )


def classify(delivery: Delivery, *, bot_logins: Collection[str] = ()) -> Intent:
    """Classify a GitLab delivery into the Intent the service acts on.

    The body's `object_kind` decides, because system hooks send `X-Gitlab-Event:
    System Hook` for every kind. A body without `object_kind` (member and subgroup
    hooks) is ignored. `bot_logins` are usernames whose comments count as a bot's,
    besides the users of project and group access tokens. Raises PayloadError naming
    the first missing or mistyped field.
    """
    fields = Fields(delivery.payload)
    object_kind = fields.optional_text("object_kind")
    if object_kind is None:
        event_name = fields.optional_text("event_name")
        detail = f" ({event_name})" if event_name else ""
        reason = f"unsupported event {delivery.event_name}{detail}"
        return Intent("ignore", reason, repository=delivery.repository)
    if object_kind in ("push", "tag_push"):
        return _classify_push(fields)
    if object_kind == "merge_request":
        return _classify_merge_request(fields)
    if object_kind == "note":
        return _classify_note(fields, bot_logins)
    return Intent("ignore", f"unsupported event {object_kind}", repository=delivery.repository)


def parse(
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret: str,
    bot_logins: Collection[str] = (),
) -> tuple[Delivery, Intent]:
    """Authenticate, decode and classify one GitLab webhook request."""
    delivery = parse_delivery(body, headers, secret=secret)
    return delivery, classify(delivery, bot_logins=bot_logins)


def _path(project: Fields) -> str:
    path = project.text("path_with_namespace")
    where = project.where("path_with_namespace")
    return check_repository_name(path, where, form="namespace/project")


def _optional_path(project: Fields | None) -> str | None:
    if project is None or project.optional_text("path_with_namespace") is None:
        return None
    return _path(project)


def _project(fields: Fields) -> tuple[str, int]:
    project = fields.child("project")
    project_id = fields.optional_integer("project_id")
    if project_id is None:
        project_id = project.integer("id")
    return _path(project), project_id


def _classify_push(fields: Fields) -> Intent:
    ref = check_ref(fields.text("ref"), fields.where("ref"))
    after = fields.text("after")
    before = fields.optional_text("before")
    repository, project_id = _project(fields)
    kind, name = ref_name(ref)
    if kind is None:
        return Intent("ignore", f"push to {ref}, which is neither a branch nor a tag", repository)
    if after == ZERO_SHA:
        return Intent("cancel_ref", f"{kind} {name} deleted", repository, ref=ref)

    # checkout_sha is the commit the ref now points at, also for pushes that list no
    # commits (a new branch without new commits, a tag).
    sha = fields.commit_id("checkout_sha" if fields.optional_text("checkout_sha") else "after")
    author = fields.optional_text("user_username") or fields.optional_text("user_name")
    trigger = Trigger(
        forge="gitlab",
        event="tag" if kind == "tag" else "push",
        repository=repository,
        sha=sha,
        ref=ref,
        branch=name if kind == "branch" else None,
        tag=name if kind == "tag" else None,
        author=author or "",
        author_id=fields.optional_integer("user_id"),
        head_repository=repository,
        head_project_id=project_id,
        before_sha=None if before in (None, ZERO_SHA) else before,
        project_id=project_id,
    )
    verb = "created" if before == ZERO_SHA else "pushed"
    return Intent("start", f"{kind} {name} {verb}", repository, trigger=trigger)


def _label_titles(labels: list[Fields]) -> tuple[str, ...]:
    return tuple(label.text("title") for label in labels)


def _label_changes(fields: Fields) -> tuple[tuple[str, ...], tuple[str, ...]]:
    changes = fields.optional_child("changes")
    labels = changes.optional_child("labels") if changes else None
    if labels is None:
        return (), ()
    previous = _label_titles(labels.child_list("previous"))
    current = _label_titles(labels.child_list("current"))
    added = tuple(title for title in current if title not in previous)
    removed = tuple(title for title in previous if title not in current)
    return added, removed


def _mr_trigger(fields: Fields, attributes: Fields, iid: int) -> Trigger:
    repository, project_id = _project(fields)
    source_project_id = attributes.integer("source_project_id")
    source = attributes.optional_child("source")
    labels = fields.child_list("labels") or attributes.child_list("labels")
    user = fields.optional_child("user")
    return Trigger(
        forge="gitlab",
        event="pull_request",
        repository=repository,
        sha=attributes.child("last_commit").commit_id("id"),
        ref=f"refs/merge-requests/{iid}/head",
        pr_number=iid,
        source_branch=attributes.text("source_branch"),
        target_branch=attributes.text("target_branch"),
        pr_labels=_label_titles(labels),
        author=(user.optional_text("username") if user else None) or "",
        author_id=attributes.optional_integer("author_id"),
        fork=source_project_id != attributes.integer("target_project_id"),
        head_repository=_optional_path(source),
        head_project_id=source_project_id,
        draft=attributes.flag("draft", default=attributes.flag("work_in_progress", False)),
        before_sha=attributes.optional_text("oldrev"),
        project_id=project_id,
    )


def _classify_merge_request(fields: Fields) -> Intent:
    attributes = fields.child("object_attributes")
    action = attributes.text("action")
    iid = attributes.integer("iid")
    repository, _ = _project(fields)
    has_new_commits = attributes.optional_text("oldrev") is not None
    if action in MR_START_ACTIONS or (action == "update" and has_new_commits):
        trigger = _mr_trigger(fields, attributes, iid)
        draft = " (draft)" if trigger.draft else ""
        what = "updated with new commits" if action == "update" else f"{action}ed"
        reason = f"merge request !{iid} {what}{draft}"
        return Intent("start", reason, repository, trigger=trigger, pr_number=iid)
    if action in MR_CANCEL_ACTIONS:
        what = "merged" if action == "merge" else "closed"
        return Intent("cancel_pr", f"merge request !{iid} {what}", repository, pr_number=iid)
    if action == "update":
        added, removed = _label_changes(fields)
        only_labels = "label change only" if added or removed else "no new commits"
        return Intent(
            "ignore",
            f"merge request !{iid} updated: {only_labels}",
            repository,
            pr_number=iid,
            labels_added=added,
            labels_removed=removed,
        )
    reason = f"merge request !{iid} {action}: starts nothing"
    return Intent("ignore", reason, repository, pr_number=iid)


def _is_bot(username: str, bot_logins: Collection[str]) -> bool:
    if _TOKEN_BOT_USERNAME.fullmatch(username):
        return True
    return username.lower() in {name.lower() for name in bot_logins}


def _note_action(attributes: Fields) -> str:
    action = attributes.optional_text("action")
    if action is not None:
        return action
    # Some GitLab versions send note hooks for edits too but no `action` field. An
    # edited note has an `updated_at` later than its `created_at`.
    created_at = attributes.optional_text("created_at")
    updated_at = attributes.optional_text("updated_at")
    if created_at and updated_at and created_at != updated_at:
        return "update"
    return "create"


def _classify_note(fields: Fields, bot_logins: Collection[str]) -> Intent:
    attributes = fields.child("object_attributes")
    repository, project_id = _project(fields)
    noteable_type = attributes.text("noteable_type")
    if noteable_type != "MergeRequest":
        what = "a plain issue" if noteable_type == "Issue" else f"a {noteable_type}"
        return Intent("ignore", f"comment on {what}", repository)
    merge_request = fields.child("merge_request")
    iid = merge_request.integer("iid")
    if _note_action(attributes) != "create":
        return Intent("ignore", "edited comment", repository, pr_number=iid)
    if attributes.flag("system", default=False):
        return Intent("ignore", "system note", repository, pr_number=iid)

    user = fields.child("user")
    username = user.text("username")
    last_commit = merge_request.optional_child("last_commit")
    comment = NewComment(
        forge="gitlab",
        repository=repository,
        pr_number=iid,
        comment_id=attributes.integer("id"),
        author=username,
        author_id=user.optional_integer("id"),
        author_is_bot=_is_bot(username, bot_logins),
        body=attributes.optional_text("note") or "",
        head_sha=last_commit.optional_commit_id("id") if last_commit else None,
        project_id=project_id,
    )
    reason = f"comment {comment.comment_id} by {username} on merge request !{iid}"
    return Intent("comment", reason, repository, comment=comment, pr_number=iid)
