"""A fake GitHub REST API: the endpoints KubeCI calls, with GitHub's errors and headers.

Tests fill it with files, pull requests, installations and permissions, then read
what the client sent from `requests`, `statuses`, `comments`, `check_runs`,
`reactions` and `labels`. Route names for `script()`: contents.get, blobs.get,
pulls.get, statuses.create, comments.list, comments.create, comments.edit,
reactions.create, check_runs.create, check_runs.update, permission.get, labels.add,
labels.remove, installation.get, installation_tokens.create, user.get, app.get.

Comments created through the fake are authored by `bot_user`, which `GET /user` returns
for a personal token. An app's comments appear as `<app_slug>[bot]`, so the default
`app_slug` matches `bot_user`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import secrets
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import jwt
from aiohttp import web
from yarl import URL

from tests.fakes import FakeServer, Rejection, Scripted, read_json

DOCS_URL = "https://docs.github.com/rest"
STATUS_STATES = frozenset({"error", "failure", "pending", "success"})
REACTIONS = frozenset({"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"})
BASE_PERMISSION = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read"}
SECONDARY_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you "
    "try again. If you reach out to GitHub Support for help, please include the "
    "request ID 8844:3EDF1D:1F13C4:2BB820:652AAB04."
)


def error(status: int, message: str, **extra: Any) -> web.Response:
    """Build an error response shaped like GitHub's."""
    body = {"message": message, "documentation_url": DOCS_URL, "status": str(status), **extra}
    return web.json_response(body, status=status)


def blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def iso(moment_s: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(moment_s), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class IssuedToken:
    installation_id: int
    expires_at_s: float
    revoked: bool = False


class FakeGitHub(FakeServer):
    """GitHub's REST API for repositories, pull requests, statuses and GitHub Apps."""

    def __init__(self, personal_tokens: tuple[str, ...] = ("ghp-test-token",)) -> None:
        super().__init__()
        self.personal_tokens = set(personal_tokens)
        self.app_id: str | None = None
        self.app_public_key: str | None = None
        self.app_slug = "kubeci"
        self.installations: dict[int, set[str]] = {}
        self.issued_tokens: dict[str, IssuedToken] = {}
        self.token_ttl_s = 3600.0
        self.large_file_bytes = 1_000_000
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.pulls: dict[tuple[str, int], dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.comments: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.permissions: dict[tuple[str, str], tuple[str, str]] = {}
        self.reactions: list[dict[str, Any]] = []
        self.labels: dict[tuple[str, int], list[str]] = {}
        self.bot_user = {"login": "kubeci[bot]", "id": 900, "type": "Bot"}
        self.rate_limit_remaining = 5000
        self._ids = itertools.count(1000)

    # Test set-up

    def set_app(self, app_id: str, public_key_pem: str) -> None:
        self.app_id = app_id
        self.app_public_key = public_key_pem

    def add_installation(self, installation_id: int, *repos: str) -> None:
        self.installations[installation_id] = {repo.lower() for repo in repos}

    def revoke_tokens(self) -> None:
        """Make every installation token issued so far invalid, as a revocation would."""
        for issued in self.issued_tokens.values():
            issued.revoked = True

    def add_file(self, repo: str, sha: str, path: str, content: bytes | str) -> None:
        data = content.encode() if isinstance(content, str) else content
        self.files[(repo.lower(), sha, path)] = data
        self.blobs[blob_sha(data)] = data

    def add_pull_request(
        self,
        repo: str,
        number: int,
        *,
        head_sha: str,
        head_ref: str = "feature",
        base_ref: str = "main",
        author: str = "alice",
        labels: tuple[str, ...] = (),
        head_repo: str | None = None,
        fork_deleted: bool = False,
        draft: bool = False,
        state: str = "open",
        merged: bool = False,
    ) -> None:
        base_repo = {"id": 1001, "full_name": repo}
        head: dict[str, Any] | None = base_repo
        if head_repo is not None:
            head = {"id": 2002, "full_name": head_repo}
        if fork_deleted:
            head = None
        self.pulls[(repo.lower(), number)] = {
            "number": number,
            "state": state,
            "merged": merged,
            "draft": draft,
            "user": {"login": author, "id": 501, "type": "User"},
            "labels": [{"id": 60 + i, "name": name} for i, name in enumerate(labels)],
            "head": {"sha": head_sha, "ref": head_ref, "repo": head},
            "base": {"sha": "0" * 39 + "1", "ref": base_ref, "repo": base_repo},
        }

    def set_permission(self, repo: str, user: str, role: str, base: str | None = None) -> None:
        """Give `user` a role; a custom role needs the base permission it extends."""
        self.permissions[(repo.lower(), user)] = (role, base or BASE_PERMISSION.get(role, role))

    def add_comment(
        self, repo: str, number: int, body: str, *, author: str = "alice", user_type: str = "User"
    ) -> dict[str, Any]:
        comment = {
            "id": next(self._ids),
            "body": body,
            "user": {"login": author, "id": 503, "type": user_type},
            "created_at": iso(time.time()),
        }
        self.comments.setdefault((repo.lower(), number), []).append(comment)
        return comment

    # Scripted failures

    def secondary_limit(self, route: str, retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        self.script(route, Scripted(403, {"message": SECONDARY_LIMIT_MESSAGE}, headers))

    def primary_limit(self, route: str, reset_in_s: float) -> None:
        headers = {
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": str(int(time.time() + reset_in_s)),
        }
        message = "API rate limit exceeded for installation ID 1."
        self.script(route, Scripted(403, {"message": message}, headers))

    def scripted_response(self, scripted: Scripted) -> web.Response:
        status = scripted.status or 200
        if status >= 400 and scripted.body is None:
            scripted = Scripted(status, {"message": HTTPStatus(status).phrase}, scripted.headers)
        if status >= 400 and isinstance(scripted.body, dict):
            body = {**scripted.body, "documentation_url": DOCS_URL, "status": str(status)}
            scripted = Scripted(status, body, scripted.headers)
        return super().scripted_response(scripted)

    def finish_response(self, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.setdefault("x-ratelimit-limit", "5000")
        headers.setdefault("x-ratelimit-remaining", str(self.rate_limit_remaining))
        headers.setdefault("x-ratelimit-reset", str(int(time.time()) + 3600))
        headers.setdefault("x-ratelimit-used", str(5000 - self.rate_limit_remaining))
        headers.setdefault("x-ratelimit-resource", "core")
        headers.setdefault("X-GitHub-Request-Id", secrets.token_hex(8).upper())
        headers.setdefault("X-GitHub-Media-Type", "github.v3; format=json")

    # Authentication

    def _bearer(self, request: web.Request) -> tuple[str, str]:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if not credential:
            raise Rejection(error(401, "Requires authentication"))
        return scheme.lower(), credential.strip()

    def _verify_jwt(self, request: web.Request) -> None:
        scheme, credential = self._bearer(request)
        if scheme != "bearer" or self.app_public_key is None:
            raise Rejection(error(401, "A JSON web token could not be decoded"))
        try:
            claims = jwt.decode(
                credential,
                self.app_public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise Rejection(error(401, f"A JSON web token could not be decoded ({exc})")) from exc
        if str(claims["iss"]) != self.app_id:
            raise Rejection(error(401, "'Issuer' claim ('iss') must be an Integer"))
        if claims["exp"] - claims["iat"] > 600:
            raise Rejection(error(401, "'Expiration time' claim ('exp') is too far in the future"))

    def _authorize(self, request: web.Request) -> str:
        """Check the token for a repository route; return "token" or "installation"."""
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}".lower()
        _, credential = self._bearer(request)
        self.rate_limit_remaining -= 1
        if credential in self.personal_tokens:
            return "token"
        issued = self.issued_tokens.get(credential)
        if issued is None or issued.revoked or issued.expires_at_s <= time.time():
            raise Rejection(error(401, "Bad credentials"))
        if repo not in self.installations.get(issued.installation_id, set()):
            raise Rejection(error(404, "Not Found"))
        return "installation"

    @staticmethod
    def _repo(request: web.Request) -> str:
        return f"{request.match_info['owner']}/{request.match_info['repo']}".lower()

    # Routes

    def add_routes(self, app: web.Application) -> None:
        repo = "/repos/{owner}/{repo}"
        routes = [
            ("GET", f"{repo}/contents/{{path:.+}}", self.get_contents, "contents.get"),
            ("GET", f"{repo}/git/blobs/{{sha}}", self.get_blob, "blobs.get"),
            ("GET", f"{repo}/pulls/{{number:\\d+}}", self.get_pull, "pulls.get"),
            ("POST", f"{repo}/statuses/{{sha}}", self.create_status, "statuses.create"),
            ("GET", f"{repo}/issues/{{number:\\d+}}/comments", self.list_comments, "comments.list"),
            (
                "POST",
                f"{repo}/issues/{{number:\\d+}}/comments",
                self.create_comment,
                "comments.create",
            ),
            ("PATCH", f"{repo}/issues/comments/{{id:\\d+}}", self.edit_comment, "comments.edit"),
            (
                "POST",
                f"{repo}/issues/comments/{{id:\\d+}}/reactions",
                self.create_reaction,
                "reactions.create",
            ),
            ("POST", f"{repo}/check-runs", self.create_check_run, "check_runs.create"),
            ("PATCH", f"{repo}/check-runs/{{id:\\d+}}", self.update_check_run, "check_runs.update"),
            (
                "GET",
                f"{repo}/collaborators/{{user}}/permission",
                self.get_permission,
                "permission.get",
            ),
            ("POST", f"{repo}/issues/{{number:\\d+}}/labels", self.add_labels, "labels.add"),
            (
                "DELETE",
                f"{repo}/issues/{{number:\\d+}}/labels/{{name}}",
                self.remove_label,
                "labels.remove",
            ),
            ("GET", f"{repo}/installation", self.get_installation, "installation.get"),
            ("GET", "/user", self.get_user, "user.get"),
            ("GET", "/app", self.get_app, "app.get"),
            (
                "POST",
                "/app/installations/{id:\\d+}/access_tokens",
                self.create_installation_token,
                "installation_tokens.create",
            ),
        ]
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)

    async def get_contents(self, request: web.Request) -> web.Response:
        self._authorize(request)
        repo, path = self._repo(request), request.match_info["path"]
        sha = request.query.get("ref", "main")
        content = self.files.get((repo, sha, path))
        if content is None:
            entries = [name for (r, s, name) in self.files if r == repo and s == sha]
            inside = sorted(name for name in entries if name.startswith(path + "/"))
            if inside:
                listing = [{"type": "file", "name": name, "path": name} for name in inside]
                return web.json_response(listing)
            return error(404, "Not Found")
        entry: dict[str, Any] = {
            "type": "file",
            "name": path.rsplit("/", 1)[-1],
            "path": path,
            "size": len(content),
            "sha": blob_sha(content),
        }
        if len(content) > self.large_file_bytes:
            entry.update(encoding="none", content="")
        else:
            encoded = base64.b64encode(content).decode()
            wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
            entry.update(encoding="base64", content=wrapped + "\n")
        return web.json_response(entry)

    async def get_blob(self, request: web.Request) -> web.Response:
        self._authorize(request)
        content = self.blobs.get(request.match_info["sha"])
        if content is None:
            return error(404, "Not Found")
        return web.json_response(
            {
                "sha": request.match_info["sha"],
                "size": len(content),
                "encoding": "base64",
                "content": base64.b64encode(content).decode(),
            }
        )

    async def get_pull(self, request: web.Request) -> web.Response:
        self._authorize(request)
        pull = self.pulls.get((self._repo(request), int(request.match_info["number"])))
        return web.json_response(pull) if pull else error(404, "Not Found")

    async def create_status(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await read_json(request)
        if data.get("state") not in STATUS_STATES:
            return error(422, "Validation Failed", errors=[{"field": "state", "code": "invalid"}])
        description = data.get("description") or ""
        if len(description) > 140:
            too_long = {
                "resource": "Status",
                "code": "custom",
                "field": "description",
                "message": "description is too long (maximum is 140 characters)",
            }
            return error(422, "Validation Failed", errors=[too_long])
        status = {"repo": self._repo(request), "sha": request.match_info["sha"], **data}
        self.statuses.append(status)
        return web.json_response({"id": next(self._ids), **data}, status=201)

    async def list_comments(self, request: web.Request) -> web.Response:
        self._authorize(request)
        comments = self.comments.get((self._repo(request), int(request.match_info["number"])), [])
        per_page = min(int(request.query.get("per_page", "30")), 100)
        page = int(request.query.get("page", "1"))
        last_page = max(1, -(-len(comments) // per_page))
        chunk = comments[(page - 1) * per_page : page * per_page]
        response = web.json_response(chunk)
        links = []
        url = URL(str(request.url))

        def link(to_page: int, rel: str) -> str:
            return f'<{url.update_query(page=str(to_page), per_page=str(per_page))}>; rel="{rel}"'

        if page < last_page:
            links += [link(page + 1, "next"), link(last_page, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        if links:
            response.headers["Link"] = ", ".join(links)
        return response

    async def create_comment(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await read_json(request)
        body = data.get("body")
        if not isinstance(body, str) or len(body) > 65536:
            return error(422, "Validation Failed", errors=[{"field": "body", "code": "invalid"}])
        key = (self._repo(request), int(request.match_info["number"]))
        comment = {
            "id": next(self._ids),
            "body": body,
            "user": dict(self.bot_user),
            "created_at": iso(time.time()),
        }
        self.comments.setdefault(key, []).append(comment)
        return web.json_response(comment, status=201)

    async def edit_comment(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await read_json(request)
        comment_id = int(request.match_info["id"])
        for (repo, _), comments in self.comments.items():
            for comment in comments:
                if repo == self._repo(request) and comment["id"] == comment_id:
                    comment["body"] = data["body"]
                    return web.json_response(comment)
        return error(404, "Not Found")

    async def create_reaction(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await read_json(request)
        content = data.get("content")
        if content not in REACTIONS:
            return error(422, "Validation Failed", errors=[{"field": "content", "code": "invalid"}])
        reaction = {"comment_id": int(request.match_info["id"]), "content": content}
        if reaction in self.reactions:
            return web.json_response({"id": 1, "content": content}, status=200)
        self.reactions.append(reaction)
        return web.json_response({"id": next(self._ids), "content": content}, status=201)

    def _check_output_error(self, data: dict[str, Any]) -> web.Response | None:
        output = data.get("output") or {}
        for key in ("summary", "text"):
            if len(output.get(key) or "") > 65535:
                message = (
                    f"Invalid request.\n\nOnly 65535 characters are allowed; {key} was longer."
                )
                return error(422, message)
        return None

    async def create_check_run(self, request: web.Request) -> web.Response:
        if self._authorize(request) != "installation":
            return error(403, "You must authenticate via a GitHub App.")
        data = await read_json(request)
        rejected = self._check_output_error(data)
        if rejected is not None:
            return rejected
        run_id = next(self._ids)
        self.check_runs[run_id] = {"id": run_id, "repo": self._repo(request), **data}
        return web.json_response({"id": run_id, **data}, status=201)

    async def update_check_run(self, request: web.Request) -> web.Response:
        if self._authorize(request) != "installation":
            return error(403, "You must authenticate via a GitHub App.")
        run = self.check_runs.get(int(request.match_info["id"]))
        if run is None:
            return error(404, "Not Found")
        data = await read_json(request)
        rejected = self._check_output_error(data)
        if rejected is not None:
            return rejected
        run.update(data)
        return web.json_response(run)

    async def get_permission(self, request: web.Request) -> web.Response:
        self._authorize(request)
        user = request.match_info["user"]
        granted = self.permissions.get((self._repo(request), user))
        if granted is None:
            return error(404, "Not Found")
        role, base = granted
        return web.json_response(
            {
                "permission": base,
                "role_name": role,
                "user": {"login": user, "id": 777, "type": "User"},
            }
        )

    async def add_labels(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await read_json(request)
        labels = self.labels.setdefault(
            (self._repo(request), int(request.match_info["number"])), []
        )
        for name in data.get("labels", []):
            if name not in labels:
                labels.append(name)
        return web.json_response([{"name": name} for name in labels])

    async def remove_label(self, request: web.Request) -> web.Response:
        self._authorize(request)
        labels = self.labels.get((self._repo(request), int(request.match_info["number"])), [])
        name = request.match_info["name"]
        if name not in labels:
            return error(404, "Label does not exist")
        labels.remove(name)
        return web.json_response([{"name": label} for label in labels])

    async def get_installation(self, request: web.Request) -> web.Response:
        self._verify_jwt(request)
        for installation_id, repos in self.installations.items():
            if self._repo(request) in repos:
                return web.json_response({"id": installation_id, "app_id": self.app_id})
        return error(404, "Not Found")

    async def get_user(self, request: web.Request) -> web.Response:
        _, credential = self._bearer(request)
        if credential in self.personal_tokens:
            return web.json_response(dict(self.bot_user))
        issued = self.issued_tokens.get(credential)
        if issued is None or issued.revoked or issued.expires_at_s <= time.time():
            return error(401, "Bad credentials")
        return error(403, "Resource not accessible by integration")

    async def get_app(self, request: web.Request) -> web.Response:
        self._verify_jwt(request)
        body = {"id": int(self.app_id or 0), "slug": self.app_slug, "name": "KubeCI"}
        return web.json_response(body)

    async def create_installation_token(self, request: web.Request) -> web.Response:
        self._verify_jwt(request)
        installation_id = int(request.match_info["id"])
        if installation_id not in self.installations:
            return error(404, "Not Found")
        token = "ghs_" + secrets.token_urlsafe(27)
        expires_at_s = time.time() + self.token_ttl_s
        self.issued_tokens[token] = IssuedToken(installation_id, expires_at_s)
        body = {
            "token": token,
            "expires_at": iso(expires_at_s),
            "permissions": {"checks": "write", "statuses": "write", "contents": "read"},
            "repository_selection": "selected",
        }
        return web.json_response(body, status=201)
