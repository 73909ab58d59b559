from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from bot.intake import gitlab
from bot.intake.events import Intent, PayloadError, SignatureError
from tests import payloads as p

TOKEN = "gl-webhook-token"


def classify(payload: dict[str, Any], **kwargs: Any) -> Intent:
    body, headers = p.gitlab_request(payload, token=TOKEN)
    _, intent = gitlab.parse(body, headers, secret=TOKEN, **kwargs)
    return intent


# Token


def test_token_valid_accepted() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN)
    assert gitlab.parse_delivery(body, headers, secret=TOKEN).event_name == "Push Hook"


def test_token_wrong_rejected() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token="guess")
    with pytest.raises(SignatureError, match="does not match"):
        gitlab.parse_delivery(body, headers, secret=TOKEN)


def test_token_missing_rejected() -> None:
    body, headers = p.gitlab_request(p.gitlab_push())
    with pytest.raises(SignatureError, match="missing"):
        gitlab.parse_delivery(body, headers, secret=TOKEN)


def test_token_non_ascii_rejected() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token="jéton")
    with pytest.raises(SignatureError):
        gitlab.parse_delivery(body, headers, secret=TOKEN)


def test_token_checked_before_body_decoded() -> None:
    with pytest.raises(SignatureError):
        gitlab.parse_delivery(b"{", {"X-Gitlab-Token": "guess"}, secret=TOKEN)


def test_token_not_checked_without_secret() -> None:
    body, headers = p.gitlab_request(p.gitlab_push())
    assert gitlab.parse_delivery(body, headers, secret="").forge == "gitlab"


# Delivery ids and body


def test_delivery_id_from_event_uuid() -> None:
    extra = {"X-Gitlab-Event-UUID": "e-uuid-1", "Idempotency-Key": "key-1"}
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN, extra_headers=extra)
    assert gitlab.parse_delivery(body, headers, secret=TOKEN).delivery_id == "e-uuid-1"


def test_delivery_id_from_webhook_uuid_and_idempotency_key() -> None:
    extra = {"Idempotency-Key": "key-1"}
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN, extra_headers=extra)
    delivery = gitlab.parse_delivery(body, headers, secret=TOKEN)
    assert delivery.delivery_id == "1b6a4a1e-9b0f-4a8e-8f53-3d0b2c7d9e10:key-1"


def test_delivery_id_from_body_hash() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN)
    delivery = gitlab.parse_delivery(body, headers, secret=TOKEN)
    assert delivery.delivery_id == "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("header", ["X-Gitlab-Event-UUID", "Idempotency-Key"])
def test_delivery_id_over_limit_rejected(header: str) -> None:
    extra = {header: "u" * 256}
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN, extra_headers=extra)
    with pytest.raises(PayloadError, match="at most 255") as caught:
        gitlab.parse_delivery(body, headers, secret=TOKEN)
    assert caught.value.field == f"header {header}"


def test_delivery_fields_read() -> None:
    body, headers = p.gitlab_request(p.gitlab_merge_request("open"), token=TOKEN)
    delivery = gitlab.parse_delivery(body, headers, secret=TOKEN)
    assert delivery.event_name == "Merge Request Hook"
    assert delivery.action == "open"
    assert delivery.repository == "acme/widgets"
    assert delivery.hook_target == "gitlab.example.com"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{", "is not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "object_kind"),
        (b'{"object_kind": "push", "total_commits_count": NaN}', "contains NaN"),
        (b'{"object_kind": "push", "total_commits_count": 1e999}', "out of range"),
    ],
)
def test_malformed_body_rejected(body: bytes, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        gitlab.parse_delivery(body, {"X-Gitlab-Token": TOKEN}, secret=TOKEN)


def test_non_json_content_type_rejected() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    with pytest.raises(PayloadError, match="Content-Type"):
        gitlab.parse_delivery(body, headers, secret=TOKEN)


# Pushes


def test_push_to_branch_starts() -> None:
    intent = classify(p.gitlab_push("refs/heads/main"))
    assert intent.kind == "start"
    trigger = intent.trigger
    assert trigger is not None
    assert trigger.forge == "gitlab"
    assert trigger.sha == p.SHA_B
    assert trigger.branch == "main"
    assert trigger.author == "alice"
    assert trigger.author_id == 7
    assert trigger.project_id == 42
    assert trigger.repository == "acme/widgets"


def test_push_labels_complete() -> None:
    intent = classify(p.gitlab_push("refs/heads/main"))
    assert intent.trigger is not None
    assert intent.trigger.labels() == {
        "forge": "gitlab",
        "event": "push",
        "trigger": "webhook",
        "repository": "acme/widgets",
        "sha": p.SHA_B,
        "ref": "refs/heads/main",
        "branch": "main",
        "author": "alice",
        "fork": "false",
    }


def test_push_without_commits_runs_on_checkout_sha() -> None:
    payload = p.gitlab_push("refs/heads/new", before=p.ZERO, commit_count=0)
    payload["checkout_sha"] = p.SHA_C
    intent = classify(payload)
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.sha == p.SHA_C


def test_push_without_commits_key_starts() -> None:
    payload = p.gitlab_push("refs/heads/new", before=p.ZERO)
    del payload["commits"]
    assert classify(payload).kind == "start"


def test_push_branch_created_starts() -> None:
    intent = classify(p.gitlab_push("refs/heads/new", before=p.ZERO))
    assert intent.kind == "start"
    assert intent.reason == "branch new created"


def test_push_branch_deleted_cancels_ref() -> None:
    intent = classify(p.gitlab_push("refs/heads/old", after=p.ZERO))
    assert intent.kind == "cancel_ref"
    assert intent.ref == "refs/heads/old"
    assert intent.trigger is None


def test_tag_push_starts_as_tag() -> None:
    intent = classify(p.gitlab_push("refs/tags/v2.0", before=p.ZERO, commit_count=0))
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.event == "tag"
    assert intent.trigger.tag == "v2.0"
    assert intent.trigger.branch is None


def test_tag_deleted_cancels_ref() -> None:
    intent = classify(p.gitlab_push("refs/tags/v2.0", after=p.ZERO))
    assert intent.kind == "cancel_ref"
    assert intent.ref == "refs/tags/v2.0"


def test_push_unicode_branch_kept() -> None:
    intent = classify(p.gitlab_push("refs/heads/функция/✓"))
    assert intent.trigger is not None
    assert intent.trigger.branch == "функция/✓"


def test_push_project_id_from_project_object() -> None:
    payload = p.gitlab_push()
    del payload["project_id"]
    intent = classify(payload)
    assert intent.trigger is not None
    assert intent.trigger.project_id == 42


# Merge requests


@pytest.mark.parametrize("action", ["open", "reopen"])
def test_merge_request_opened_starts(action: str) -> None:
    intent = classify(p.gitlab_merge_request(action))
    assert intent.kind == "start"
    assert intent.pr_number == 3


def test_merge_request_trigger_fields() -> None:
    intent = classify(p.gitlab_merge_request("open", labels=("backend",), author_id=11))
    trigger = intent.trigger
    assert trigger is not None
    assert trigger.sha == p.SHA_C
    assert trigger.ref == "refs/merge-requests/3/head"
    assert trigger.pr_number == 3
    assert trigger.source_branch == "feature"
    assert trigger.target_branch == "main"
    assert trigger.pr_labels == ("backend",)
    assert trigger.author == "alice"
    assert trigger.author_id == 11
    assert trigger.fork is False
    assert trigger.project_id == 42


def test_merge_request_update_with_new_commits_starts() -> None:
    intent = classify(p.gitlab_merge_request("update", oldrev=p.SHA_A))
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.before_sha == p.SHA_A


def test_merge_request_update_without_oldrev_ignored() -> None:
    intent = classify(p.gitlab_merge_request("update"))
    assert intent.kind == "ignore"
    assert intent.trigger is None


def test_merge_request_label_change_exposed() -> None:
    payload = p.gitlab_merge_request(
        "update", labels=("backend", "ok-to-test"), previous_labels=("backend", "wip")
    )
    intent = classify(payload)
    assert intent.kind == "ignore"
    assert "label change only" in intent.reason
    assert intent.labels_added == ("ok-to-test",)
    assert intent.labels_removed == ("wip",)
    assert intent.pr_number == 3


@pytest.mark.parametrize("action", ["close", "merge"])
def test_merge_request_closed_cancels(action: str) -> None:
    intent = classify(p.gitlab_merge_request(action))
    assert intent.kind == "cancel_pr"
    assert intent.pr_number == 3


@pytest.mark.parametrize("action", ["approved", "unapproved", "approval", "unapproval"])
def test_merge_request_approvals_ignored(action: str) -> None:
    assert classify(p.gitlab_merge_request(action)).kind == "ignore"


def test_merge_request_from_fork_marked() -> None:
    payload = p.gitlab_merge_request("open", source_project_id=77, source_path="mallory/widgets")
    intent = classify(payload)
    assert intent.trigger is not None
    assert intent.trigger.fork is True
    assert intent.trigger.head_repository == "mallory/widgets"
    assert intent.trigger.head_project_id == 77
    assert intent.trigger.project_id == 42


def test_merge_request_draft_flag_exposed() -> None:
    intent = classify(p.gitlab_merge_request("open", draft=True))
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.draft is True


def test_merge_request_work_in_progress_read_as_draft() -> None:
    payload = p.gitlab_merge_request("open")
    del payload["object_attributes"]["draft"]
    payload["object_attributes"]["work_in_progress"] = True
    intent = classify(payload)
    assert intent.trigger is not None
    assert intent.trigger.draft is True


def test_merge_request_unicode_branches_kept() -> None:
    intent = classify(p.gitlab_merge_request("open", source_branch="ветка", target_branch="主"))
    assert intent.trigger is not None
    assert intent.trigger.source_branch == "ветка"
    assert intent.trigger.target_branch == "主"


def test_merge_request_labels_from_attributes() -> None:
    payload = p.gitlab_merge_request("open")
    del payload["labels"]
    payload["object_attributes"]["labels"] = [{"id": 1, "title": "ops"}]
    intent = classify(payload)
    assert intent.trigger is not None
    assert intent.trigger.pr_labels == ("ops",)


# Notes


def test_note_on_merge_request_classified() -> None:
    intent = classify(p.gitlab_note(body="/test all", note_id=55, user_id=9, username="erin"))
    assert intent.kind == "comment"
    comment = intent.comment
    assert comment is not None
    assert comment.pr_number == 3
    assert comment.comment_id == 55
    assert comment.author == "erin"
    assert comment.author_id == 9
    assert comment.author_is_bot is False
    assert comment.body == "/test all"
    assert comment.head_sha == p.SHA_C
    assert comment.project_id == 42


def test_note_without_action_read_as_new() -> None:
    assert classify(p.gitlab_note(action=None)).kind == "comment"


def test_note_without_action_but_edited_ignored() -> None:
    intent = classify(p.gitlab_note(action=None, edited=True))
    assert intent.kind == "ignore"
    assert intent.reason == "edited comment"


def test_note_edited_ignored() -> None:
    intent = classify(p.gitlab_note(action="update"))
    assert intent.kind == "ignore"
    assert intent.reason == "edited comment"


def test_note_system_ignored() -> None:
    intent = classify(p.gitlab_note(system=True))
    assert intent.kind == "ignore"


@pytest.mark.parametrize(
    ("noteable_type", "reason"),
    [("Issue", "comment on a plain issue"), ("Commit", "comment on a Commit")],
)
def test_note_elsewhere_ignored(noteable_type: str, reason: str) -> None:
    intent = classify(p.gitlab_note(noteable_type=noteable_type))
    assert intent.kind == "ignore"
    assert intent.reason == reason


@pytest.mark.parametrize("username", ["project_42_bot", "group_7_bot_1f2e3d4c", "KubeCI"])
def test_note_by_bot_flagged(username: str) -> None:
    intent = classify(p.gitlab_note(username=username), bot_logins=["kubeci"])
    assert intent.comment is not None
    assert intent.comment.author_is_bot is True


# Other events


def test_pipeline_event_ignored() -> None:
    payload = {"object_kind": "pipeline", "project": p.gitlab_project()}
    intent = classify(payload)
    assert intent.kind == "ignore"
    assert intent.reason == "unsupported event pipeline"


def test_system_hook_classified_by_object_kind() -> None:
    body, headers = p.gitlab_request(p.gitlab_push(), token=TOKEN)
    headers["X-Gitlab-Event"] = "System Hook"
    delivery, intent = gitlab.parse(body, headers, secret=TOKEN)
    assert delivery.event_name == "System Hook"
    assert intent.kind == "start"


def _member_hook() -> dict[str, Any]:
    return {
        "created_at": "2024-01-01T00:00:00Z",
        "group_name": "acme",
        "group_path": "acme",
        "group_id": 7,
        "user_username": "carol",
        "user_id": 64,
        "group_access": "Guest",
        "event_name": "user_add_to_group",
    }


def test_member_hook_ignored() -> None:
    body = json.dumps(_member_hook()).encode()
    headers = {"X-Gitlab-Event": "Member Hook", "X-Gitlab-Token": TOKEN}
    delivery, intent = gitlab.parse(body, headers, secret=TOKEN)
    assert delivery.event_name == "Member Hook"
    assert intent.kind == "ignore"
    assert intent.reason == "unsupported event Member Hook (user_add_to_group)"


def test_event_name_without_header_ignored() -> None:
    payload = {"event_name": "subgroup_create", "group_id": 8, "parent_group_id": 7}
    body = json.dumps(payload).encode()
    delivery, intent = gitlab.parse(body, {"X-Gitlab-Token": TOKEN}, secret=TOKEN)
    assert delivery.event_name == "subgroup_create"
    assert intent.kind == "ignore"


def test_unnamed_event_rejected() -> None:
    body = json.dumps({"group_id": 8}).encode()
    with pytest.raises(PayloadError) as caught:
        gitlab.parse_delivery(body, {"X-Gitlab-Token": TOKEN}, secret=TOKEN)
    assert caught.value.field == "header X-Gitlab-Event"


# Malformed payloads


def _field_error(payload: dict[str, Any]) -> str:
    with pytest.raises(PayloadError) as caught:
        classify(payload)
    return caught.value.field


def test_missing_last_commit_named() -> None:
    payload = p.gitlab_merge_request("open")
    del payload["object_attributes"]["last_commit"]
    assert _field_error(payload) == "object_attributes.last_commit"


def test_mistyped_iid_named() -> None:
    payload = p.gitlab_merge_request("open")
    payload["object_attributes"]["iid"] = "3"
    assert _field_error(payload) == "object_attributes.iid"


def test_missing_project_path_named() -> None:
    payload = p.gitlab_push()
    del payload["project"]["path_with_namespace"]
    assert _field_error(payload) == "project.path_with_namespace"


@pytest.mark.parametrize("path", ["acme/../widgets", "acme/.", "widgets", "acme//widgets"])
def test_invalid_project_path_named(path: str) -> None:
    payload = p.gitlab_push()
    payload["project"]["path_with_namespace"] = path
    assert _field_error(payload) == "project.path_with_namespace"


def test_project_path_over_limit_named() -> None:
    payload = p.gitlab_push()
    payload["project"]["path_with_namespace"] = "acme/" + "w" * 508
    assert _field_error(payload) == "project.path_with_namespace"


def test_push_ref_over_limit_named() -> None:
    payload = p.gitlab_push()
    payload["ref"] = "refs/tags/" + "v" * 1015
    assert _field_error(payload) == "ref"


def test_nested_project_path_accepted() -> None:
    payload = p.gitlab_push()
    payload["project"]["path_with_namespace"] = "acme/platform/widgets.v2"
    assert classify(payload).repository == "acme/platform/widgets.v2"


def test_push_checkout_sha_not_commit_id_named() -> None:
    payload = p.gitlab_push()
    payload["checkout_sha"] = "main"
    assert _field_error(payload) == "checkout_sha"


def test_push_after_not_commit_id_named() -> None:
    payload = p.gitlab_push(after="HEAD")
    payload["checkout_sha"] = None
    assert _field_error(payload) == "after"


def test_merge_request_last_commit_not_commit_id_named() -> None:
    payload = p.gitlab_merge_request("open", last_commit="c" * 12)
    assert _field_error(payload) == "object_attributes.last_commit.id"


def test_note_last_commit_not_commit_id_named() -> None:
    payload = p.gitlab_note()
    payload["merge_request"]["last_commit"]["id"] = "not-a-sha"
    assert _field_error(payload) == "merge_request.last_commit.id"


def test_missing_merge_request_on_note_named() -> None:
    payload = p.gitlab_note()
    del payload["merge_request"]
    assert _field_error(payload) == "merge_request"


def test_mistyped_label_change_named() -> None:
    payload = p.gitlab_merge_request("update", labels=("a",), previous_labels=())
    payload["changes"]["labels"]["current"] = "a"
    assert _field_error(payload) == "changes.labels.current"


def test_missing_action_named() -> None:
    payload = p.gitlab_merge_request("open")
    del payload["object_attributes"]["action"]
    assert _field_error(payload) == "object_attributes.action"
