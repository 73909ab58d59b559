"""Builders of GitHub and GitLab webhook payloads and signed requests for tests.

The payloads have the structure the forges document, trimmed to the fields KubeCI
reads plus a few it does not, so that parsers are tested against realistic shapes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse
from typing import Any

ZERO = "0" * 40
SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40


# GitHub


def github_user(
    login: str = "alice", user_id: int = 501, user_type: str = "User"
) -> dict[str, Any]:
    return {"login": login, "id": user_id, "type": user_type, "site_admin": False}


def github_repo(full_name: str = "octo-org/widgets", repo_id: int = 1001) -> dict[str, Any]:
    owner, name = full_name.split("/")
    return {
        "id": repo_id,
        "name": name,
        "full_name": full_name,
        "private": False,
        "owner": github_user(owner, repo_id + 1, "Organization"),
        "fork": False,
        "default_branch": "main",
    }


def _with_installation(payload: dict[str, Any], installation_id: int | None) -> dict[str, Any]:
    if installation_id is not None:
        payload["installation"] = {"id": installation_id, "node_id": "MDIzOkludGVncmF0aW9u"}
    return payload


def github_ping(hook_id: int = 77) -> dict[str, Any]:
    return {
        "zen": "Keep it logically awesome.",
        "hook_id": hook_id,
        "hook": {"type": "Repository", "id": hook_id, "events": ["*"], "config": {}},
        "repository": github_repo(),
        "sender": github_user(),
    }


def github_push(
    ref: str = "refs/heads/main",
    *,
    before: str = SHA_A,
    after: str = SHA_B,
    forced: bool = False,
    sender: str = "alice",
    repo: dict[str, Any] | None = None,
    installation_id: int | None = None,
) -> dict[str, Any]:
    created = before == ZERO
    deleted = after == ZERO
    commits = [] if deleted else [{"id": after, "message": "Fix\r\n", "distinct": True}]
    payload: dict[str, Any] = {
        "ref": ref,
        "before": before,
        "after": after,
        "created": created,
        "deleted": deleted,
        "forced": forced,
        "base_ref": None,
        "compare": "https://github.com/octo-org/widgets/compare/x...y",
        "commits": commits,
        "head_commit": None if deleted else commits[0],
        "repository": repo or github_repo(),
        "pusher": {"name": sender, "email": None},
        "sender": github_user(sender),
    }
    return _with_installation(payload, installation_id)


def github_create(ref_type: str = "tag", ref: str = "v1.0.0") -> dict[str, Any]:
    return {
        "ref": ref,
        "ref_type": ref_type,
        "master_branch": "main",
        "pusher_type": "user",
        "repository": github_repo(),
        "sender": github_user(),
    }


def github_pr_object(
    *,
    number: int = 7,
    head_sha: str = SHA_C,
    head_ref: str = "feature",
    base_ref: str = "main",
    head_repo: dict[str, Any] | None = None,
    base_repo: dict[str, Any] | None = None,
    fork_deleted: bool = False,
    author: str = "alice",
    labels: tuple[str, ...] = (),
    draft: bool = False,
    merged: bool = False,
    state: str = "open",
) -> dict[str, Any]:
    base = base_repo or github_repo()
    head = None if fork_deleted else (head_repo or base)
    return {
        "url": f"https://api.github.com/repos/{base['full_name']}/pulls/{number}",
        "id": 900000 + number,
        "number": number,
        "state": state,
        "locked": False,
        "title": "Improve widgets",
        "user": github_user(author),
        "body": None,
        "labels": [
            {"id": 60 + i, "name": name, "color": "ededed"} for i, name in enumerate(labels)
        ],
        "draft": draft,
        "merged": merged,
        "merge_commit_sha": SHA_A if merged else None,
        "head": {"label": f"x:{head_ref}", "ref": head_ref, "sha": head_sha, "repo": head},
        "base": {"label": f"y:{base_ref}", "ref": base_ref, "sha": SHA_A, "repo": base},
        "author_association": "CONTRIBUTOR",
    }


def github_pull_request(
    action: str = "opened",
    *,
    label: str | None = None,
    installation_id: int | None = None,
    **pr_fields: Any,
) -> dict[str, Any]:
    pr = github_pr_object(**pr_fields)
    payload: dict[str, Any] = {
        "action": action,
        "number": pr["number"],
        "pull_request": pr,
        "repository": pr["base"]["repo"],
        "sender": github_user(),
    }
    if action == "synchronize":
        payload["before"] = SHA_A
        payload["after"] = pr["head"]["sha"]
    if label is not None:
        payload["label"] = {"id": 61, "name": label, "color": "ededed"}
    return _with_installation(payload, installation_id)


def github_issue_comment(
    action: str = "created",
    *,
    number: int = 7,
    on_pull_request: bool = True,
    body: str | None = "/retest",
    author: str = "alice",
    user_type: str = "User",
    comment_id: int = 5001,
    association: str = "MEMBER",
    installation_id: int | None = None,
) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "number": number,
        "title": "Improve widgets",
        "user": github_user("bob", 502),
        "state": "open",
        "labels": [],
    }
    if on_pull_request:
        issue["pull_request"] = {
            "url": f"https://api.github.com/repos/octo-org/widgets/pulls/{number}",
        }
    payload: dict[str, Any] = {
        "action": action,
        "issue": issue,
        "comment": {
            "id": comment_id,
            "user": github_user(author, 503, user_type),
            "body": body,
            "author_association": association,
        },
        "repository": github_repo(),
        "sender": github_user(author, 503, user_type),
    }
    if action == "edited":
        payload["changes"] = {"body": {"from": "/tset"}}
    return _with_installation(payload, installation_id)


def sign_github(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_request(
    payload: dict[str, Any],
    event: str,
    *,
    secret: str = "",
    delivery: str = "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    form: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Return the body and headers GitHub would send for `payload`."""
    text = json.dumps(payload, ensure_ascii=False)
    if form:
        body = urllib.parse.urlencode({"payload": text}).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        body = text.encode()
        content_type = "application/json"
    headers = {
        "User-Agent": "GitHub-Hookshot/044aadd",
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Hook-ID": "292430182",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": "1001",
    }
    if secret:
        headers["X-Hub-Signature-256"] = sign_github(body, secret)
        headers["X-Hub-Signature"] = (
            "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
        )
    return body, headers


# GitLab


def gitlab_project(project_id: int = 42, path: str = "acme/widgets") -> dict[str, Any]:
    return {
        "id": project_id,
        "name": path.rsplit("/", 1)[-1],
        "web_url": f"https://gitlab.example.com/{path}",
        "path_with_namespace": path,
        "default_branch": "main",
        "namespace": path.split("/")[0],
    }


def gitlab_push(
    ref: str = "refs/heads/main",
    *,
    before: str = SHA_A,
    after: str = SHA_B,
    commit_count: int = 1,
    project_id: int = 42,
    path: str = "acme/widgets",
    username: str = "alice",
) -> dict[str, Any]:
    deleted = after == ZERO
    commits = [{"id": after, "message": "Fix\n"} for _ in range(commit_count)]
    return {
        "object_kind": "tag_push" if ref.startswith("refs/tags/") else "push",
        "event_name": "tag_push" if ref.startswith("refs/tags/") else "push",
        "before": before,
        "after": after,
        "ref": ref,
        "ref_protected": False,
        "checkout_sha": None if deleted else after,
        "message": None,
        "user_id": 7,
        "user_name": "Alice Example",
        "user_username": username,
        "project_id": project_id,
        "project": gitlab_project(project_id, path),
        "commits": [] if deleted else commits,
        "total_commits_count": 0 if deleted else commit_count,
        "repository": {"name": "widgets", "homepage": f"https://gitlab.example.com/{path}"},
    }


def _gitlab_labels(titles: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"id": 300 + i, "title": title, "color": "#428BCA"} for i, title in enumerate(titles)]


def gitlab_mr_object(
    *,
    iid: int = 3,
    last_commit: str = SHA_C,
    source_branch: str = "feature",
    target_branch: str = "main",
    source_project_id: int = 42,
    target_project_id: int = 42,
    source_path: str = "acme/widgets",
    author_id: int = 7,
    draft: bool = False,
    state: str = "opened",
) -> dict[str, Any]:
    return {
        "id": 9000 + iid,
        "iid": iid,
        "title": "Improve widgets",
        "source_branch": source_branch,
        "target_branch": target_branch,
        "source_project_id": source_project_id,
        "target_project_id": target_project_id,
        "author_id": author_id,
        "state": state,
        "draft": draft,
        "work_in_progress": draft,
        "last_commit": {"id": last_commit, "message": "Fix\n", "title": "Fix"},
        "source": gitlab_project(source_project_id, source_path),
        "target": gitlab_project(target_project_id),
    }


def gitlab_merge_request(
    action: str = "open",
    *,
    oldrev: str | None = None,
    labels: tuple[str, ...] = (),
    previous_labels: tuple[str, ...] | None = None,
    username: str = "alice",
    project_id: int = 42,
    **mr_fields: Any,
) -> dict[str, Any]:
    attributes = gitlab_mr_object(target_project_id=project_id, **mr_fields)
    attributes["action"] = action
    if oldrev is not None:
        attributes["oldrev"] = oldrev
    changes: dict[str, Any] = {}
    if previous_labels is not None:
        changes["labels"] = {
            "previous": _gitlab_labels(previous_labels),
            "current": _gitlab_labels(labels),
        }
    return {
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 7, "name": "Alice Example", "username": username},
        "project": gitlab_project(project_id),
        "object_attributes": attributes,
        "labels": _gitlab_labels(labels),
        "changes": changes,
    }


def gitlab_note(
    *,
    noteable_type: str = "MergeRequest",
    body: str = "/retest",
    username: str = "alice",
    user_id: int = 7,
    note_id: int = 1244,
    action: str | None = "create",
    system: bool = False,
    iid: int = 3,
    edited: bool = False,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "id": note_id,
        "note": body,
        "noteable_type": noteable_type,
        "author_id": user_id,
        "system": system,
        "created_at": "2024-05-17 17:06:40 UTC",
        "updated_at": "2024-05-17 17:09:12 UTC" if edited else "2024-05-17 17:06:40 UTC",
        "url": f"https://gitlab.example.com/acme/widgets/-/merge_requests/{iid}#note_{note_id}",
    }
    if action is not None:
        attributes["action"] = action
    payload: dict[str, Any] = {
        "object_kind": "note",
        "event_type": "note",
        "user": {"id": user_id, "name": "Alice Example", "username": username},
        "project_id": 42,
        "project": gitlab_project(),
        "object_attributes": attributes,
    }
    if noteable_type == "MergeRequest":
        payload["merge_request"] = gitlab_mr_object(iid=iid)
    elif noteable_type == "Issue":
        payload["issue"] = {"id": 92, "iid": 17, "title": "Widgets break"}
    return payload


GITLAB_EVENT_HEADERS = {
    "push": "Push Hook",
    "tag_push": "Tag Push Hook",
    "merge_request": "Merge Request Hook",
    "note": "Note Hook",
    "pipeline": "Pipeline Hook",
}


def gitlab_request(
    payload: dict[str, Any],
    *,
    token: str = "",
    extra_headers: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Return the body and headers GitLab would send for `payload`."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    headers = {
        "User-Agent": "GitLab/17.5.0",
        "Content-Type": "application/json",
        "X-Gitlab-Event": GITLAB_EVENT_HEADERS.get(payload["object_kind"], "System Hook"),
        "X-Gitlab-Instance": "gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "1b6a4a1e-9b0f-4a8e-8f53-3d0b2c7d9e10",
    }
    if token:
        headers["X-Gitlab-Token"] = token
    headers.update(extra_headers or {})
    return body, headers
