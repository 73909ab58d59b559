"""A fake GitLab REST API (v4): the endpoints KubeCI calls, with GitLab's errors.

Commit statuses follow GitLab's state machine: a status with the same name, ref and
commit moves pending -> running -> success/failed/canceled, and a move that the
machine does not allow gets GitLab's 400 "Cannot transition status" response. Route
names for `script()`: files.raw, merge_requests.get, merge_requests.update,
statuses.create, notes.list, notes.create, notes.update, award_emoji.create,
members.get, user.get. Notes created through the fake are authored by `bot_user`, the
token's user that `GET /user` returns.
"""

from __future__ import annotations

import itertools
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from yarl import URL

from tests.fakes import FakeServer, Rejection, Scripted, read_json

STATUS_STATES = frozenset({"pending", "running", "success", "failed", "canceled"})
# The state-machine event GitLab fires for each requested state, and the states that
# event may start from. None is a status that does not exist yet.
TRANSITIONS: dict[str, tuple[str, frozenset[str | None]]] = {
    "pending": ("enqueue", frozenset({None})),
    "running": ("run", frozenset({None, "pending"})),
    "success": ("success", frozenset({None, "pending", "running"})),
    "failed": ("drop", frozenset({None, "pending", "running"})),
    "canceled": ("cancel", frozenset({None, "pending", "running"})),
}


def error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class FakeGitLab(FakeServer):
    """GitLab's REST API for files, merge requests, statuses, notes and members."""

    def __init__(self, token: str = "glpat-test-token") -> None:
        super().__init__()
        self.tokens = {token}
        self.projects: dict[int, str] = {}
        self.files: dict[tuple[int, str, str], bytes] = {}
        self.merge_requests: dict[tuple[int, int], dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.status_states: dict[tuple[int, str, str, str], str] = {}
        self.notes: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.members: dict[tuple[int, int], int] = {}
        self.award_emoji: list[dict[str, Any]] = []
        self.bot_user = {"id": 99, "username": "project_42_bot_5c1d", "name": "KubeCI"}
        self._ids = itertools.count(2000)

    # Test set-up

    def add_project(self, project_id: int, path: str) -> None:
        self.projects[project_id] = path

    def add_file(self, project_id: int, sha: str, path: str, content: bytes | str) -> None:
        data = content.encode() if isinstance(content, str) else content
        self.files[(project_id, sha, path)] = data

    def add_merge_request(
        self,
        project_id: int,
        iid: int,
        *,
        sha: str,
        source_branch: str = "feature",
        target_branch: str = "main",
        source_project_id: int | None = None,
        author: str = "alice",
        author_id: int = 7,
        labels: tuple[str, ...] = (),
        draft: bool = False,
        state: str = "opened",
    ) -> None:
        self.merge_requests[(project_id, iid)] = {
            "id": 9000 + iid,
            "iid": iid,
            "project_id": project_id,
            "title": "Improve widgets",
            "state": state,
            "sha": sha,
            "source_branch": source_branch,
            "target_branch": target_branch,
            "source_project_id": source_project_id or project_id,
            "target_project_id": project_id,
            "author": {"id": author_id, "username": author, "name": author.title()},
            "labels": list(labels),
            "draft": draft,
            "work_in_progress": draft,
        }

    def add_note(
        self, project_id: int, iid: int, body: str, *, author: str = "alice", system: bool = False
    ) -> dict[str, Any]:
        note = self._note(body, {"id": 7, "username": author, "name": author.title()}, iid)
        note["system"] = system
        self.notes.setdefault((project_id, iid), []).append(note)
        return note

    def set_member(self, project_id: int, user_id: int, access_level: int) -> None:
        self.members[(project_id, user_id)] = access_level

    # Scripted failures

    def rate_limit(self, route: str, retry_after_s: int | None = None) -> None:
        reset_s = int(time.time()) + (retry_after_s or 60)
        headers = {
            "RateLimit-Limit": "600",
            "RateLimit-Observed": "601",
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(reset_s),
            "Content-Type": "text/plain",
        }
        if retry_after_s is not None:
            headers["Retry-After"] = str(retry_after_s)
        self.script(route, Scripted(429, "Retry later\n", headers))

    def scripted_response(self, scripted: Scripted) -> web.Response:
        status = scripted.status or 200
        if status >= 400 and scripted.body is None:
            message = f"{status} {HTTPStatus(status).phrase}"
            scripted = Scripted(status, {"message": message}, scripted.headers)
        return super().scripted_response(scripted)

    # Helpers

    def _authorize(self, request: web.Request) -> None:
        token = request.headers.get("PRIVATE-TOKEN")
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        if token in self.tokens or (scheme.lower() == "bearer" and bearer in self.tokens):
            return
        raise Rejection(error(401, "401 Unauthorized"))

    def _project_id(self, request: web.Request) -> int:
        self._authorize(request)
        ref = request.match_info["project"]
        if ref.isdigit() and int(ref) in self.projects:
            return int(ref)
        for project_id, path in self.projects.items():
            if path == ref:
                return project_id
        raise Rejection(error(404, "404 Project Not Found"))

    def _merge_request(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        project_id = self._project_id(request)
        mr = self.merge_requests.get((project_id, int(request.match_info["iid"])))
        if mr is None:
            raise Rejection(error(404, "404 Not found"))
        return project_id, mr

    def _note(self, body: str, author: dict[str, Any], iid: int) -> dict[str, Any]:
        return {
            "id": next(self._ids),
            "type": None,
            "body": body,
            "author": author,
            "system": False,
            "noteable_type": "MergeRequest",
            "noteable_iid": iid,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }

    # Routes

    def add_routes(self, app: web.Application) -> None:
        project = "/api/v4/projects/{project}"
        mr = f"{project}/merge_requests/{{iid:\\d+}}"
        routes = [
            ("GET", f"{project}/repository/files/{{path}}/raw", self.get_raw_file, "files.raw"),
            ("GET", mr, self.get_merge_request, "merge_requests.get"),
            ("PUT", mr, self.update_merge_request, "merge_requests.update"),
            ("POST", f"{project}/statuses/{{sha}}", self.create_status, "statuses.create"),
            ("GET", f"{mr}/notes", self.list_notes, "notes.list"),
            ("POST", f"{mr}/notes", self.create_note, "notes.create"),
            ("PUT", f"{mr}/notes/{{note_id:\\d+}}", self.update_note, "notes.update"),
            (
                "POST",
                f"{mr}/notes/{{note_id:\\d+}}/award_emoji",
                self.award,
                "award_emoji.create",
            ),
            ("GET", f"{project}/members/all/{{user_id:\\d+}}", self.get_member, "members.get"),
            ("GET", "/api/v4/user", self.get_user, "user.get"),
        ]
        for method, path, handler, name in routes:
            app.router.add_route(method, path, handler, name=name)

    async def get_raw_file(self, request: web.Request) -> web.Response:
        project_id = self._project_id(request)
        ref = request.query.get("ref")
        if not ref:
            return web.json_response({"error": "ref is missing"}, status=400)
        content = self.files.get((project_id, ref, request.match_info["path"]))
        if content is None:
            return error(404, "404 File Not Found")
        return web.Response(body=content, content_type="text/plain")

    async def get_merge_request(self, request: web.Request) -> web.Response:
        _, mr = self._merge_request(request)
        return web.json_response(mr)

    async def update_merge_request(self, request: web.Request) -> web.Response:
        _, mr = self._merge_request(request)
        data = await read_json(request)
        for name in str(data.get("add_labels") or "").split(","):
            if name and name not in mr["labels"]:
                mr["labels"].append(name)
        for name in str(data.get("remove_labels") or "").split(","):
            if name in mr["labels"]:
                mr["labels"].remove(name)
        return web.json_response(mr)

    async def create_status(self, request: web.Request) -> web.Response:
        project_id = self._project_id(request)
        data = await read_json(request)
        state = data.get("state")
        if state not in STATUS_STATES:
            return web.json_response({"error": "state does not have a valid value"}, status=400)
        name = data.get("name") or data.get("context") or "default"
        sha = request.match_info["sha"]
        key = (project_id, sha, name, data.get("ref") or "")
        current = self.status_states.get(key)
        event, allowed_from = TRANSITIONS[state]
        if current not in allowed_from:
            message = (
                f"Cannot transition status via :{event} from :{current} "
                f'(Reason(s): Status cannot transition via "{event}")'
            )
            return error(400, message)
        if state in ("pending", "running"):
            self.status_states[key] = state
        else:
            self.status_states.pop(key, None)
        self.statuses.append({"project_id": project_id, "sha": sha, **data})
        body = {"id": next(self._ids), "sha": sha, "status": state, "name": name, **data}
        return web.json_response(body, status=201)

    async def list_notes(self, request: web.Request) -> web.Response:
        project_id, mr = self._merge_request(request)
        notes = list(self.notes.get((project_id, mr["iid"]), []))
        if request.query.get("sort") == "desc":
            notes.reverse()
        per_page = min(int(request.query.get("per_page", "20")), 100)
        page = int(request.query.get("page", "1"))
        total_pages = max(1, -(-len(notes) // per_page))
        response = web.json_response(notes[(page - 1) * per_page : page * per_page])
        url = URL(str(request.url))

        def link(to_page: int, rel: str) -> str:
            return f'<{url.update_query(page=str(to_page), per_page=str(per_page))}>; rel="{rel}"'

        links = [link(1, "first"), link(total_pages, "last")]
        if page < total_pages:
            links.insert(0, link(page + 1, "next"))
            response.headers["X-Next-Page"] = str(page + 1)
        response.headers.update(
            {
                "Link": ", ".join(links),
                "X-Page": str(page),
                "X-Per-Page": str(per_page),
                "X-Total": str(len(notes)),
                "X-Total-Pages": str(total_pages),
            }
        )
        return response

    async def create_note(self, request: web.Request) -> web.Response:
        project_id, mr = self._merge_request(request)
        data = await read_json(request)
        body = data.get("body")
        if not isinstance(body, str) or not body:
            return web.json_response({"error": "body is missing"}, status=400)
        note = self._note(body, dict(self.bot_user), mr["iid"])
        self.notes.setdefault((project_id, mr["iid"]), []).append(note)
        return web.json_response(note, status=201)

    async def update_note(self, request: web.Request) -> web.Response:
        project_id, mr = self._merge_request(request)
        data = await read_json(request)
        note_id = int(request.match_info["note_id"])
        for note in self.notes.get((project_id, mr["iid"]), []):
            if note["id"] == note_id:
                note["body"] = data["body"]
                return web.json_response(note)
        return error(404, "404 Note Not Found")

    async def award(self, request: web.Request) -> web.Response:
        project_id, mr = self._merge_request(request)
        data = await read_json(request)
        note_id = int(request.match_info["note_id"])
        notes = self.notes.get((project_id, mr["iid"]), [])
        if not any(note["id"] == note_id for note in notes):
            return error(404, "404 Note Not Found")
        award = {"note_id": note_id, "name": data.get("name"), "user": self.bot_user["id"]}
        if award in self.award_emoji:
            return error(404, "404 Award Emoji Name has already been taken Not Found")
        self.award_emoji.append(award)
        return web.json_response({"id": next(self._ids), **award}, status=201)

    async def get_user(self, request: web.Request) -> web.Response:
        """Return the token's own user, `bot_user`."""
        self._authorize(request)
        return web.json_response({**self.bot_user, "state": "active", "bot": True})

    async def get_member(self, request: web.Request) -> web.Response:
        project_id = self._project_id(request)
        user_id = int(request.match_info["user_id"])
        level = self.members.get((project_id, user_id))
        if level is None:
            return error(404, "404 Not found")
        body = {"id": user_id, "username": f"user{user_id}", "access_level": level}
        return web.json_response({**body, "state": "active"})
