"""GitLab REST API client for reports and chat-ops, built on python-gitlab.

python-gitlab is synchronous, so every call runs in a worker thread
(`asyncio.to_thread`) under an overall timeout, and its HTTP session uses the
configured per-request timeout. Its own sleeping retries (on 429 and 5xx) are turned
off: the outbox sender retries, using `ForgeRateLimited.retry_after_s`.

A project is named by its numeric id or its full path (`group/sub/project`).
REST reference: https://docs.gitlab.com/ee/api/rest/
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import gitlab
import gitlab.exceptions
import requests  # type: ignore[import-untyped]

from bot.config import ConfigError, Settings
from bot.forges.errors import (
    ForgeAuthError,
    ForgeClientError,
    ForgeConnectionError,
    ForgeError,
    ForgeNotFound,
    ForgeRateLimited,
    ForgeResponseError,
    ForgeServerError,
    parse_retry_after,
    seconds_until_epoch,
)
from bot.forges.models import (
    Comment,
    PullRequest,
    PullRequestState,
    StatusState,
    response_field,
    truncate_text,
)

log = logging.getLogger(__name__)

FORGE = "gitlab"
# NOTE: GitLab documents no maximum for a commit status description. KubeCI assumes
# that 255 characters are always stored in full.
STATUS_DESCRIPTION_MAX_CHARS = 255
NOTE_MAX_CHARS = 1_000_000
# Access levels: Guest 10, Reporter 20, Developer 30, Maintainer 40, Owner 50.
DEVELOPER_ACCESS_LEVEL = 30
RATE_LIMIT_DEFAULT_WAIT_S = 60.0
_REMEMBERED_STATUSES_MAX = 4096

_STATUS_STATES: dict[StatusState, str] = {
    "pending": "pending",
    "running": "running",
    "success": "success",
    "failure": "failed",
    "error": "failed",
    "canceled": "canceled",
}
_ACTIVE_STATES = frozenset({"pending", "running"})

ProjectRef = int | str
T = TypeVar("T")

# Headers of the last response in this worker thread. python-gitlab's exceptions do
# not carry headers, and Retry-After is needed to classify a 429.
_last_response = threading.local()


def _remember_response(response: Any, *args: Any, **kwargs: Any) -> None:
    _last_response.headers = dict(response.headers)


class _Gitlab(gitlab.Gitlab):
    """A python-gitlab client that never sleeps and retries on its own."""

    def http_request(self, verb: str, path: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(obey_rate_limit=False, retry_transient_errors=False, max_retries=0)
        return super().http_request(verb, path, *args, **kwargs)


def error_for_exception(
    exc: Exception, what: str, headers: Mapping[str, str], now_s: float
) -> ForgeError:
    """Build the ForgeError subclass for a python-gitlab or requests exception."""
    if isinstance(exc, requests.RequestException | gitlab.exceptions.GitlabConnectionError):
        return ForgeConnectionError(f"GitLab {what} failed: {exc}", forge=FORGE)
    if isinstance(exc, gitlab.exceptions.GitlabParsingError):
        return ForgeResponseError(f"GitLab {what}: unreadable response: {exc}", forge=FORGE)
    assert isinstance(exc, gitlab.exceptions.GitlabError)
    status = exc.response_code
    lowered = {name.lower(): value for name, value in headers.items()}
    message = f"GitLab {what} failed with {status}: {exc.error_message}"
    common: dict[str, Any] = {"forge": FORGE, "status": status, "headers": lowered}
    common["body"] = exc.response_body or str(exc.error_message)
    if status == 429:
        wait_s = parse_retry_after(lowered.get("retry-after"), now_s)
        if wait_s is None:
            wait_s = seconds_until_epoch(lowered.get("ratelimit-reset"), now_s)
        wait_s = RATE_LIMIT_DEFAULT_WAIT_S if wait_s is None else wait_s
        return ForgeRateLimited(message, retry_after_s=wait_s, **common)
    if status in (401, 403):
        return ForgeAuthError(message, **common)
    if status in (404, 410):
        return ForgeNotFound(message, **common)
    if status is not None and status >= 500:
        return ForgeServerError(message, **common)
    return ForgeClientError(message, **common)


def _is_transition_rejection(error: ForgeError) -> bool:
    # GitLab responds with 400 "Cannot transition status via :run from :running" when
    # a status is set to the state it already has, or to pending while running.
    return error.status == 400 and "Cannot transition status" in error.body


def _comment(data: Mapping[str, Any], what: str) -> Comment:
    author = response_field(data, "author", dict, forge=FORGE, what=what)
    body = data.get("body")
    return Comment(
        id=response_field(data, "id", int, forge=FORGE, what=what),
        body=body if isinstance(body, str) else "",
        author=response_field(author, "username", str, forge=FORGE, what=what),
        author_is_bot=data.get("system") is True,
    )


def _merge_request(data: Mapping[str, Any], what: str) -> PullRequest:
    author = response_field(data, "author", dict, forge=FORGE, what=what)
    source_id = response_field(data, "source_project_id", int, forge=FORGE, what=what)
    target_id = response_field(data, "target_project_id", int, forge=FORGE, what=what)
    gitlab_state = response_field(data, "state", str, forge=FORGE, what=what)
    state: PullRequestState = "open"
    if gitlab_state in ("merged", "closed"):
        state = "merged" if gitlab_state == "merged" else "closed"
    raw_labels = data.get("labels")
    labels: list[Any] = raw_labels if isinstance(raw_labels, list) else []
    return PullRequest(
        number=response_field(data, "iid", int, forge=FORGE, what=what),
        state=state,
        head_sha=response_field(data, "sha", str, forge=FORGE, what=what),
        head_ref=response_field(data, "source_branch", str, forge=FORGE, what=what),
        base_ref=response_field(data, "target_branch", str, forge=FORGE, what=what),
        head_repository=str(source_id),
        base_repository=str(target_id),
        author=response_field(author, "username", str, forge=FORGE, what=what),
        author_id=author.get("id") if isinstance(author.get("id"), int) else None,
        labels=tuple(label for label in labels if isinstance(label, str)),
        draft=data.get("draft") is True or data.get("work_in_progress") is True,
        fork=source_id != target_id,
    )


@dataclass(frozen=True)
class TokenUser:
    """The GitLab user a token authenticates as."""

    id: int
    username: str


def _check_label(label: str) -> None:
    # GitLab splits add_labels and remove_labels at commas.
    if not label or "," in label:
        raise ValueError(f"GitLab label {label!r} must be non-empty and contain no comma")


class GitLabClient:
    """Calls the GitLab REST API of one GitLab instance with a project or group token.

    `timeout_s` bounds each HTTP request; `call_timeout_s` bounds one operation,
    which may make several requests (pages of notes), and defaults to four times
    `timeout_s`. `clock` returns Unix time in seconds, for reset headers.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        call_timeout_s: float | None = None,
        user_agent: str = "kubeci",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = requests.Session()
        self._session.hooks["response"].append(_remember_response)
        self._gl = _Gitlab(
            url,
            private_token=token,
            timeout=timeout_s,
            user_agent=user_agent,
            session=self._session,
        )
        self._call_timeout_s = call_timeout_s if call_timeout_s is not None else 4 * timeout_s
        self._clock = clock
        self._sent_states: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._token_user: TokenUser | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GitLabClient:
        """Build a client from KUBECI_GITLAB_* settings; raises ConfigError when unusable."""
        if not settings.gitlab_token:
            raise ConfigError("no GitLab credentials: set KUBECI_GITLAB_TOKEN")
        return cls(settings.gitlab_url, settings.gitlab_token, timeout_s=settings.gitlab_timeout_s)

    def close(self) -> None:
        self._session.close()

    async def _run(self, what: str, operation: Callable[[], T]) -> T:
        """Run a blocking python-gitlab `operation` in a worker thread, with a timeout."""
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await asyncio.to_thread(self._translate_errors, what, operation)
        except TimeoutError as exc:
            message = f"GitLab {what} timed out after {self._call_timeout_s} s"
            raise ForgeConnectionError(message, forge=FORGE) from exc

    def _translate_errors(self, what: str, operation: Callable[[], T]) -> T:
        _last_response.headers = {}
        try:
            return operation()
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            headers = getattr(_last_response, "headers", {})
            raise error_for_exception(exc, what, headers, self._clock()) from exc

    async def authenticated_username(self) -> str:
        """Return the username of the token's user (`GET /user`), looked up once.

        For a project or group access token, that is the bot user GitLab created for it.
        Raises ForgeError when the lookup fails.
        """
        user = await self.current_user()
        return user.username

    def _project(self, project: ProjectRef) -> Any:
        # python-gitlab percent-encodes the slashes of a path but not its dots, and
        # requests resolves a "." or ".." segment against the URL before it.
        if isinstance(project, str) and any(part in (".", "..") for part in project.split("/")):
            raise ValueError(f"GitLab project path may not contain '.' or '..', got {project!r}")
        return self._gl.projects.get(project, lazy=True)

    def _mr(self, project: ProjectRef, iid: int) -> Any:
        return self._project(project).mergerequests.get(iid, lazy=True)

    async def current_user(self) -> TokenUser:
        """Return the user the token authenticates as (`GET /user`), read once per client.

        A failed read is not remembered, so the next call tries again.
        """
        if self._token_user is None:
            what = "read of the token's user"

            def read() -> Any:
                return self._gl.http_get("/user")

            data = await self._run(what, read)
            self._token_user = TokenUser(
                id=response_field(data, "id", int, forge=FORGE, what=what),
                username=response_field(data, "username", str, forge=FORGE, what=what),
            )
            log.info(
                "KubeCI comments on GitLab as %s", self._token_user.username, extra={"forge": FORGE}
            )
        return self._token_user

    async def get_file(self, project: ProjectRef, path: str, sha: str) -> bytes | None:
        """Return the content of `path` at commit `sha`, or None when there is no such file."""
        what = f"file read of {path} at {sha} in project {project}"

        def read() -> bytes:
            content: bytes = self._project(project).files.raw(file_path=path, ref=sha)
            return content

        try:
            return await self._run(what, read)
        except ForgeNotFound:
            log.info("%s: not found", what, extra={"forge": FORGE, "repository": str(project)})
            return None

    async def get_merge_request(self, project: ProjectRef, iid: int) -> PullRequest:
        what = f"read of merge request !{iid} in project {project}"

        def read() -> dict[str, Any]:
            attributes: dict[str, Any] = self._project(project).mergerequests.get(iid).attributes
            return attributes

        return _merge_request(await self._run(what, read), what)

    async def create_status(
        self,
        project: ProjectRef,
        sha: str,
        state: StatusState,
        context: str,
        description: str,
        target_url: str | None = None,
        *,
        ref: str | None = None,
    ) -> None:
        """Set the commit status `context` (GitLab's `name`) on `sha`.

        GitLab allows pending -> running -> success/failed/canceled and rejects a
        status set to the state it already has. A repeat of the last pending or
        running state this client sent is skipped, and GitLab's rejection of a
        transition is taken to mean the status already has that state.
        """
        gitlab_state = _STATUS_STATES[state]
        key = (str(project), sha, context)
        if gitlab_state in _ACTIVE_STATES and self._sent_states.get(key) == gitlab_state:
            log.debug("status %s is already %s on %s", context, gitlab_state, sha)
            return
        data: dict[str, str] = {
            "state": gitlab_state,
            "name": context,
            "description": truncate_text(description, STATUS_DESCRIPTION_MAX_CHARS),
        }
        if target_url:
            data["target_url"] = target_url
        if ref:
            data["ref"] = ref
        what = f"status {context}={gitlab_state} on {sha} in project {project}"
        commit = self._project(project).commits.get(sha, lazy=True)
        try:
            await self._run(what, lambda: commit.statuses.create(data))
        except ForgeClientError as exc:
            if not _is_transition_rejection(exc):
                raise
            log.info("%s: GitLab reports the status already has that state", what)
        self._remember_state(key, gitlab_state)

    def _remember_state(self, key: tuple[str, str, str], state: str) -> None:
        self._sent_states[key] = state
        self._sent_states.move_to_end(key)
        while len(self._sent_states) > _REMEMBERED_STATUSES_MAX:
            self._sent_states.popitem(last=False)

    async def list_notes(self, project: ProjectRef, iid: int) -> list[Comment]:
        """Return every note of merge request !`iid`, oldest first, across all pages."""
        what = f"note listing of !{iid} in project {project}"

        def read() -> list[dict[str, Any]]:
            notes = self._mr(project, iid).notes.list(
                iterator=True, sort="asc", order_by="created_at", per_page=100
            )
            return [note.attributes for note in notes]

        return [_comment(note, what) for note in await self._run(what, read)]

    async def create_note(self, project: ProjectRef, iid: int, body: str) -> Comment:
        what = f"note on !{iid} in project {project}"
        data = {"body": truncate_text(body, NOTE_MAX_CHARS)}

        def create() -> dict[str, Any]:
            attributes: dict[str, Any] = self._mr(project, iid).notes.create(data).attributes
            return attributes

        return _comment(await self._run(what, create), what)

    async def edit_note(self, project: ProjectRef, iid: int, note_id: int, body: str) -> Comment:
        what = f"edit of note {note_id} on !{iid} in project {project}"
        data = {"body": truncate_text(body, NOTE_MAX_CHARS)}

        def update() -> dict[str, Any]:
            attributes: dict[str, Any] = self._mr(project, iid).notes.update(note_id, data)
            return attributes

        return _comment(await self._run(what, update), what)

    async def find_note_by_marker(
        self, project: ProjectRef, iid: int, marker: str, *, author: str | None = None
    ) -> Comment | None:
        """Return the oldest non-system note containing `marker` (by `author` if given)."""
        for note in await self.list_notes(project, iid):
            if note.author_is_bot:
                continue
            if marker in note.body and (author is None or note.author == author):
                return note
        return None

    async def get_access_level(self, project: ProjectRef, user_id: int) -> int:
        """Return the user's access level in the project, inherited ones included.

        A user who is not a member gets 0.
        """
        what = f"membership read of user {user_id} in project {project}"

        def read() -> int:
            level: int = self._project(project).members_all.get(user_id).access_level
            return level

        try:
            return await self._run(what, read)
        except ForgeNotFound:
            return 0

    async def has_write_access(self, project: ProjectRef, user_id: int) -> bool:
        """Tell whether the user is a Developer or higher in the project."""
        return await self.get_access_level(project, user_id) >= DEVELOPER_ACCESS_LEVEL

    async def award_emoji(self, project: ProjectRef, iid: int, note_id: int, name: str) -> None:
        """Award emoji `name` (such as `thumbsup` or `eyes`) to a note on !`iid`.

        Awarding the same emoji twice is not an error.
        """
        what = f"award {name} to note {note_id} on !{iid} in project {project}"
        note = self._mr(project, iid).notes.get(note_id, lazy=True)
        try:
            await self._run(what, lambda: note.awardemojis.create({"name": name}))
        except ForgeNotFound as exc:
            # NOTE: GitLab is expected to respond to a repeated award with a 404 whose
            # message contains "has already been taken"; this is not documented.
            if "already been taken" not in exc.body:
                raise

    async def add_label(self, project: ProjectRef, iid: int, label: str) -> None:
        _check_label(label)
        what = f"label {label} on !{iid} in project {project}"
        manager = self._project(project).mergerequests
        await self._run(what, lambda: manager.update(iid, {"add_labels": label}))

    async def remove_label(self, project: ProjectRef, iid: int, label: str) -> None:
        """Remove `label` from !`iid`. A label that is not there is not an error."""
        _check_label(label)
        what = f"label removal of {label} from !{iid} in project {project}"
        manager = self._project(project).mergerequests
        await self._run(what, lambda: manager.update(iid, {"remove_labels": label}))
