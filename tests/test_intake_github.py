from __future__ import annotations

import json
from typing import Any

import pytest

from bot.intake import github
from bot.intake.events import Delivery, Intent, PayloadError, SignatureError
from tests import payloads as p

SECRET = "It's a Secret to Everybody"


def classify(payload: dict[str, Any], event: str, **kwargs: Any) -> Intent:
    body, headers = p.github_request(payload, event, secret=SECRET)
    _, intent = github.parse(body, headers, secret=SECRET, **kwargs)
    return intent


def deliver(payload: dict[str, Any], event: str) -> Delivery:
    body, headers = p.github_request(payload, event, secret=SECRET)
    return github.parse_delivery(body, headers, secret=SECRET)


# Signatures


def test_signature_valid_accepted() -> None:
    delivery = deliver(p.github_ping(), "ping")
    assert delivery.event_name == "ping"


def test_signature_wrong_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret="another secret")
    with pytest.raises(SignatureError, match="does not match"):
        github.parse_delivery(body, headers, secret=SECRET)


def test_signature_over_modified_body_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    with pytest.raises(SignatureError):
        github.parse_delivery(body + b" ", headers, secret=SECRET)


def test_signature_missing_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping")
    with pytest.raises(SignatureError, match="X-Hub-Signature-256 is missing"):
        github.parse_delivery(body, headers, secret=SECRET)


def test_signature_sha1_only_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    del headers["X-Hub-Signature-256"]
    with pytest.raises(SignatureError, match="SHA-1"):
        github.parse_delivery(body, headers, secret=SECRET)


@pytest.mark.parametrize("value", ["sha256", "sha256=", "md5=abc", "", "sha256=ünï"])
def test_signature_malformed_rejected(value: str) -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    headers["X-Hub-Signature-256"] = value
    with pytest.raises(SignatureError):
        github.parse_delivery(body, headers, secret=SECRET)


def test_signature_checked_before_body_decoded() -> None:
    with pytest.raises(SignatureError):
        github.parse_delivery(b"{not json", {"X-GitHub-Event": "push"}, secret=SECRET)


def test_signature_header_name_case_ignored() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    lowered = {name.lower(): value for name, value in headers.items()}
    assert github.parse_delivery(body, lowered, secret=SECRET).event_name == "ping"


def test_signature_not_checked_without_secret() -> None:
    body, headers = p.github_request(p.github_ping(), "ping")
    assert github.parse_delivery(body, headers, secret="").event_name == "ping"


# Body and headers


def test_form_encoded_body_accepted() -> None:
    payload = p.github_push()
    body, headers = p.github_request(payload, "push", secret=SECRET, form=True)
    delivery, intent = github.parse(body, headers, secret=SECRET)
    assert delivery.payload == payload
    assert intent.kind == "start"


def test_form_without_payload_field_rejected() -> None:
    body = b"other=1"
    headers = {"X-GitHub-Event": "push", "Content-Type": "application/x-www-form-urlencoded"}
    headers["X-Hub-Signature-256"] = p.sign_github(body, SECRET)
    with pytest.raises(PayloadError, match="form field payload is missing"):
        github.parse_delivery(body, headers, secret=SECRET)


def test_unsupported_content_type_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    headers["Content-Type"] = "text/plain"
    with pytest.raises(PayloadError) as caught:
        github.parse_delivery(body, headers, secret=SECRET)
    assert caught.value.field == "header Content-Type"


def test_content_type_charset_accepted() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    headers["Content-Type"] = "application/json; charset=utf-8"
    assert github.parse_delivery(body, headers, secret=SECRET).event_name == "ping"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{", "is not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b"\xff\xfe{}", "is not"),
        (b"", "is not valid JSON"),
        (b'{"zen": NaN}', "contains NaN"),
        (b'{"zen": -Infinity}', "contains -Infinity"),
        (b'{"zen": 1e400}', "1e400, which is out of range"),
        (b'{"zen": 1' + b"0" * 4300 + b"}", "integer of 4301 digits"),
        (b'{"zen": ' + b"[" * 100 + b"]" * 100 + b"}", "deeper than 100 levels"),
        (b'{"zen": ' * 100_000 + b"1" + b"}" * 100_000, "deeper than 100 levels"),
    ],
)
def test_malformed_body_rejected(body: bytes, problem: str) -> None:
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": p.sign_github(body, SECRET)}
    with pytest.raises(PayloadError, match=problem):
        github.parse_delivery(body, headers, secret=SECRET)


def test_event_header_missing_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    del headers["X-GitHub-Event"]
    with pytest.raises(PayloadError) as caught:
        github.parse_delivery(body, headers, secret=SECRET)
    assert caught.value.field == "header X-GitHub-Event"


def test_delivery_fields_read_from_headers() -> None:
    delivery = deliver(p.github_pull_request("opened"), "pull_request")
    assert delivery.forge == "github"
    assert delivery.delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert delivery.action == "opened"
    assert delivery.repository == "octo-org/widgets"
    assert delivery.hook_target == "repository:1001"


def test_delivery_id_missing_falls_back_to_body_hash() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    del headers["X-GitHub-Delivery"]
    delivery = github.parse_delivery(body, headers, secret=SECRET)
    assert delivery.delivery_id.startswith("sha256:")


def test_delivery_id_over_limit_rejected() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    headers["X-GitHub-Delivery"] = "d" * 256
    with pytest.raises(PayloadError, match="at most 255") as caught:
        github.parse_delivery(body, headers, secret=SECRET)
    assert caught.value.field == "header X-GitHub-Delivery"


def test_delivery_id_at_limit_accepted() -> None:
    body, headers = p.github_request(p.github_ping(), "ping", secret=SECRET)
    headers["X-GitHub-Delivery"] = "d" * 255
    assert github.parse_delivery(body, headers, secret=SECRET).delivery_id == "d" * 255


# Ping and pushes


def test_ping_classified() -> None:
    intent = classify(p.github_ping(hook_id=77), "ping")
    assert intent.kind == "ping"
    assert "77" in intent.reason


def test_push_to_branch_starts() -> None:
    intent = classify(p.github_push("refs/heads/main", installation_id=12), "push")
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.sha == p.SHA_B
    assert intent.trigger.ref == "refs/heads/main"
    assert intent.trigger.branch == "main"
    assert intent.trigger.tag is None
    assert intent.trigger.before_sha == p.SHA_A
    assert intent.trigger.installation_id == 12


def test_push_labels_complete() -> None:
    intent = classify(p.github_push("refs/heads/main", sender="carol"), "push")
    assert intent.trigger is not None
    assert intent.trigger.labels() == {
        "forge": "github",
        "event": "push",
        "trigger": "webhook",
        "repository": "octo-org/widgets",
        "sha": p.SHA_B,
        "ref": "refs/heads/main",
        "branch": "main",
        "author": "carol",
        "fork": "false",
    }


def test_push_forced_starts() -> None:
    intent = classify(p.github_push(forced=True), "push")
    assert intent.kind == "start"
    assert intent.reason == "forced push to branch main"


def test_push_branch_created_starts() -> None:
    intent = classify(p.github_push("refs/heads/new", before=p.ZERO), "push")
    assert intent.kind == "start"
    assert intent.reason == "branch new created"
    assert intent.trigger is not None
    assert intent.trigger.before_sha is None


def test_push_branch_deleted_cancels_ref() -> None:
    intent = classify(p.github_push("refs/heads/old", after=p.ZERO), "push")
    assert intent.kind == "cancel_ref"
    assert intent.ref == "refs/heads/old"
    assert intent.trigger is None


def test_push_deleted_flag_alone_cancels_ref() -> None:
    payload = p.github_push("refs/heads/old")
    payload["deleted"] = True
    assert classify(payload, "push").kind == "cancel_ref"


def test_push_tag_created_starts_as_tag() -> None:
    intent = classify(p.github_push("refs/tags/v1.2.0", before=p.ZERO), "push")
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.event == "tag"
    assert intent.trigger.tag == "v1.2.0"
    assert intent.trigger.branch is None
    labels = intent.trigger.labels()
    assert labels["tag"] == "v1.2.0"
    assert "branch" not in labels


def test_push_tag_deleted_cancels_ref() -> None:
    intent = classify(p.github_push("refs/tags/v1.2.0", after=p.ZERO), "push")
    assert intent.kind == "cancel_ref"
    assert intent.ref == "refs/tags/v1.2.0"


def test_push_to_other_ref_ignored() -> None:
    intent = classify(p.github_push("refs/notes/commits"), "push")
    assert intent.kind == "ignore"


def test_push_unicode_branch_kept() -> None:
    intent = classify(p.github_push("refs/heads/fix/ünïcode-✓"), "push")
    assert intent.trigger is not None
    assert intent.trigger.branch == "fix/ünïcode-✓"


def test_push_unicode_tag_kept_after_form_encoding() -> None:
    body, headers = p.github_request(
        p.github_push("refs/tags/版本-1"), "push", secret=SECRET, form=True
    )
    _, intent = github.parse(body, headers, secret=SECRET)
    assert intent.trigger is not None
    assert intent.trigger.tag == "版本-1"


@pytest.mark.parametrize("event", ["create", "delete"])
def test_create_and_delete_events_ignored(event: str) -> None:
    intent = classify(p.github_create(), event)
    assert intent.kind == "ignore"
    assert "push event" in intent.reason


# Pull requests


@pytest.mark.parametrize("action", ["opened", "synchronize", "reopened", "ready_for_review"])
def test_pull_request_action_starts(action: str) -> None:
    intent = classify(p.github_pull_request(action), "pull_request")
    assert intent.kind == "start"
    assert intent.pr_number == 7


def test_pull_request_trigger_fields() -> None:
    payload = p.github_pull_request(
        "opened", labels=("bug", "ok-to-test"), author="dave", installation_id=9
    )
    intent = classify(payload, "pull_request")
    trigger = intent.trigger
    assert trigger is not None
    assert trigger.sha == p.SHA_C
    assert trigger.ref == "refs/pull/7/head"
    assert trigger.source_branch == "feature"
    assert trigger.target_branch == "main"
    assert trigger.pr_labels == ("bug", "ok-to-test")
    assert trigger.author == "dave"
    assert trigger.fork is False
    assert trigger.head_repository == "octo-org/widgets"
    assert trigger.installation_id == 9
    assert trigger.source() == {
        "forge": "github",
        "repository": "octo-org/widgets",
        "installation_id": 9,
        "head_repository": "octo-org/widgets",
    }


def test_pull_request_labels_complete() -> None:
    intent = classify(p.github_pull_request("opened", labels=("bug",)), "pull_request")
    assert intent.trigger is not None
    assert intent.trigger.labels() == {
        "forge": "github",
        "event": "pull_request",
        "trigger": "webhook",
        "repository": "octo-org/widgets",
        "sha": p.SHA_C,
        "ref": "refs/pull/7/head",
        "author": "alice",
        "fork": "false",
        "pr.number": "7",
        "pr.source_branch": "feature",
        "pr.target_branch": "main",
        "pr.labels": ["bug"],
    }


def test_pull_request_draft_starts_with_flag() -> None:
    intent = classify(p.github_pull_request("opened", draft=True), "pull_request")
    assert intent.kind == "start"
    assert intent.trigger is not None
    assert intent.trigger.draft is True


def test_pull_request_from_fork_marked() -> None:
    fork = p.github_repo("mallory/widgets", repo_id=2002)
    intent = classify(p.github_pull_request("opened", head_repo=fork), "pull_request")
    assert intent.trigger is not None
    assert intent.trigger.fork is True
    assert intent.trigger.head_repository == "mallory/widgets"
    assert intent.trigger.repository == "octo-org/widgets"


def test_pull_request_from_deleted_fork_marked() -> None:
    intent = classify(p.github_pull_request("synchronize", fork_deleted=True), "pull_request")
    assert intent.trigger is not None
    assert intent.trigger.fork is True
    assert intent.trigger.head_repository is None


def test_pull_request_unicode_branches_kept() -> None:
    payload = p.github_pull_request("opened", head_ref="fonctionnalité/é", base_ref="主")
    intent = classify(payload, "pull_request")
    assert intent.trigger is not None
    assert intent.trigger.source_branch == "fonctionnalité/é"
    assert intent.trigger.target_branch == "主"


@pytest.mark.parametrize(("merged", "words"), [(True, "merged"), (False, "without merging")])
def test_pull_request_closed_cancels(merged: bool, words: str) -> None:
    intent = classify(p.github_pull_request("closed", merged=merged), "pull_request")
    assert intent.kind == "cancel_pr"
    assert intent.pr_number == 7
    assert words in intent.reason


def test_pull_request_labeled_ignored_with_label() -> None:
    intent = classify(p.github_pull_request("labeled", label="ok-to-test"), "pull_request")
    assert intent.kind == "ignore"
    assert intent.reason.startswith("label change only")
    assert intent.labels_added == ("ok-to-test",)
    assert intent.labels_removed == ()
    assert intent.pr_number == 7


def test_pull_request_unlabeled_ignored_with_label() -> None:
    intent = classify(p.github_pull_request("unlabeled", label="ok-to-test"), "pull_request")
    assert intent.kind == "ignore"
    assert intent.labels_removed == ("ok-to-test",)
    assert intent.labels_added == ()


@pytest.mark.parametrize("action", ["edited", "converted_to_draft", "assigned", "locked"])
def test_pull_request_other_actions_ignored(action: str) -> None:
    intent = classify(p.github_pull_request(action), "pull_request")
    assert intent.kind == "ignore"
    assert intent.trigger is None


# Comments


def test_comment_on_pull_request_classified() -> None:
    payload = p.github_issue_comment(body="/retest\n", comment_id=88, installation_id=4)
    intent = classify(payload, "issue_comment")
    assert intent.kind == "comment"
    comment = intent.comment
    assert comment is not None
    assert comment.pr_number == 7
    assert comment.comment_id == 88
    assert comment.author == "alice"
    assert comment.author_is_bot is False
    assert comment.body == "/retest\n"
    assert comment.author_association == "MEMBER"
    assert comment.installation_id == 4


def test_comment_null_body_read_as_empty() -> None:
    intent = classify(p.github_issue_comment(body=None), "issue_comment")
    assert intent.comment is not None
    assert intent.comment.body == ""


def test_comment_by_bot_type_flagged() -> None:
    payload = p.github_issue_comment(author="helper", user_type="Bot")
    intent = classify(payload, "issue_comment")
    assert intent.comment is not None
    assert intent.comment.author_is_bot is True


def test_comment_by_app_login_flagged() -> None:
    intent = classify(p.github_issue_comment(author="kubeci[bot]"), "issue_comment")
    assert intent.comment is not None
    assert intent.comment.author_is_bot is True


def test_comment_by_configured_bot_login_flagged() -> None:
    payload = p.github_issue_comment(author="KubeCI-Robot")
    intent = classify(payload, "issue_comment", bot_logins=["kubeci-robot"])
    assert intent.comment is not None
    assert intent.comment.author_is_bot is True


@pytest.mark.parametrize("action", ["edited", "deleted"])
def test_comment_changed_ignored(action: str) -> None:
    intent = classify(p.github_issue_comment(action), "issue_comment")
    assert intent.kind == "ignore"
    assert intent.reason == f"{action} comment"


def test_comment_on_plain_issue_ignored() -> None:
    intent = classify(p.github_issue_comment(on_pull_request=False), "issue_comment")
    assert intent.kind == "ignore"
    assert intent.reason == "comment on a plain issue"


# Other events


@pytest.mark.parametrize(
    "event",
    ["pull_request_review", "check_suite", "check_run", "installation", "star"],
)
def test_other_events_ignored_with_reason(event: str) -> None:
    payload = {"action": "requested", "repository": p.github_repo(), "sender": p.github_user()}
    intent = classify(payload, event)
    assert intent.kind == "ignore"
    assert intent.reason


def test_unknown_event_names_itself() -> None:
    intent = classify({"repository": p.github_repo()}, "star")
    assert intent.reason == "unsupported event star"


# Malformed payloads


def _field_error(payload: dict[str, Any], event: str) -> str:
    with pytest.raises(PayloadError) as caught:
        classify(payload, event)
    return caught.value.field


def test_missing_head_sha_named() -> None:
    payload = p.github_pull_request("opened")
    del payload["pull_request"]["head"]["sha"]
    assert _field_error(payload, "pull_request") == "pull_request.head.sha"


def test_mistyped_number_named() -> None:
    payload = p.github_pull_request("opened")
    payload["pull_request"]["number"] = "7"
    assert _field_error(payload, "pull_request") == "pull_request.number"


def test_boolean_number_rejected() -> None:
    payload = p.github_pull_request("opened")
    payload["pull_request"]["number"] = True
    assert _field_error(payload, "pull_request") == "pull_request.number"


def test_mistyped_label_item_named() -> None:
    payload = p.github_pull_request("opened")
    payload["pull_request"]["labels"] = ["bug"]
    assert _field_error(payload, "pull_request") == "pull_request.labels[0]"


def test_labels_not_array_named() -> None:
    payload = p.github_pull_request("opened")
    payload["pull_request"]["labels"] = {"name": "bug"}
    assert _field_error(payload, "pull_request") == "pull_request.labels"


def test_null_repository_named() -> None:
    payload = p.github_push()
    payload["repository"] = None
    assert _field_error(payload, "push") == "repository"


@pytest.mark.parametrize(
    "full_name",
    ["octo-org/widgets/extra", "octo-org/..", "../widgets", "./widgets", "widgets", "octo org/w"],
)
def test_invalid_repository_name_named(full_name: str) -> None:
    payload = p.github_push()
    payload["repository"]["full_name"] = full_name
    assert _field_error(payload, "push") == "repository.full_name"


def test_invalid_head_repository_named() -> None:
    payload = p.github_pull_request("opened", head_repo=p.github_repo("fork-owner/widgets", 2002))
    payload["pull_request"]["head"]["repo"]["full_name"] = "fork-owner/.."
    assert _field_error(payload, "pull_request") == "pull_request.head.repo.full_name"


def test_repository_name_with_dots_accepted() -> None:
    payload = p.github_push()
    payload["repository"]["full_name"] = "octo-org/widgets.js"
    assert classify(payload, "push").repository == "octo-org/widgets.js"


@pytest.mark.parametrize("after", ["main", "HEAD", "b" * 39, "b" * 41, "g" * 40, ""])
def test_push_after_not_commit_id_named(after: str) -> None:
    payload = p.github_push(after=after)
    assert _field_error(payload, "push") == "after"


def test_push_sha256_commit_id_accepted() -> None:
    intent = classify(p.github_push(after="d" * 64), "push")
    assert intent.trigger is not None
    assert intent.trigger.sha == "d" * 64


def test_pull_request_head_sha_not_commit_id_named() -> None:
    payload = p.github_pull_request("opened", head_sha="refs/heads/main")
    assert _field_error(payload, "pull_request") == "pull_request.head.sha"


def test_push_ref_over_limit_named() -> None:
    payload = p.github_push(ref="refs/heads/" + "é" * 507)
    assert _field_error(payload, "push") == "ref"


def test_missing_ref_named() -> None:
    payload = p.github_push()
    del payload["ref"]
    assert _field_error(payload, "push") == "ref"


def test_mistyped_comment_user_named() -> None:
    payload = p.github_issue_comment()
    payload["comment"]["user"] = "alice"
    assert _field_error(payload, "issue_comment") == "comment.user"


def test_payload_error_message_names_field() -> None:
    payload = p.github_push()
    payload["after"] = 5
    with pytest.raises(PayloadError, match="after must be a string, got integer"):
        classify(payload, "push")


def test_every_truncated_pull_request_raises_payload_error() -> None:
    # Drop each field the parser reads in turn: only PayloadError may come out.
    original = p.github_pull_request("opened", labels=("bug",))
    paths = [
        ("action",),
        ("pull_request", "number"),
        ("pull_request", "head"),
        ("pull_request", "base", "repo"),
        ("pull_request", "base", "ref"),
        ("pull_request", "user"),
        ("repository",),
    ]
    for path in paths:
        payload = json.loads(json.dumps(original))
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = [] if path[-1] != "action" else None
        with pytest.raises(PayloadError):
            classify(payload, "pull_request")
