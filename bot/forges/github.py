"""GitHub REST API client for reports and chat-ops, built on gidgethub's aiohttp adapter.

Authentication is a personal access token or a GitHub App. An app signs a JWT with its
private key, looks up the installation of each repository, and exchanges the JWT for
an installation token. Installation tokens live one hour; they are cached per
installation, replaced 5 minutes before they expire, and replaced once more when
GitHub responds with 401.

Every failure raises a `bot.forges.errors.ForgeError` subclass. The client does not
retry 5xx or rate-limited calls itself; the outbox sender does, using
`ForgeRateLimited.retry_after_s`.
REST reference: https://docs.github.com/en/rest
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import gidgethub
import gidgethub.aiohttp
import gidgethub.apps
import jwt

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
    body_excerpt,
    parse_retry_after,
    seconds_until_epoch,
)
from bot.forges.models import (
    Comment,
    Permission,
    PullRequest,
    PullRequestState,
    StatusState,
    response_field,
    truncate_text,
)

log = logging.getLogger(__name__)

FORGE = "github"
DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
STATUS_DESCRIPTION_MAX_CHARS = 140
CHECK_RUN_TEXT_MAX_CHARS = 65535
COMMENT_MAX_CHARS = 65536
TOKEN_REFRESH_MARGIN_S = 300.0
# GitHub's rate-limit documentation recommends waiting at least one minute after a
# secondary rate limit whose response gives no time to wait.
SECONDARY_LIMIT_WAIT_S = 60.0
REACTIONS = frozenset({"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"})
PERMISSIONS: frozenset[str] = frozenset({"admin", "maintain", "write", "triage", "read", "none"})

CheckStatus = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal[
    "action_required", "cancelled", "failure", "neutral", "success", "skipped", "timed_out"
]

_STATUS_STATES: dict[StatusState, str] = {
    "pending": "pending",
    "running": "pending",
    "success": "success",
    "failure": "failure",
    "error": "error",
    "canceled": "error",
}

T = TypeVar("T")


@dataclass(frozen=True)
class TokenAuth:
    """A personal access token or any other token sent as `Authorization: token ...`."""

    token: str = field(repr=False)


@dataclass(frozen=True)
class AppAuth:
    """A GitHub App: its id and its PEM-encoded RSA private key."""

    app_id: str
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class CheckOutput:
    """The `output` of a check run. `summary` and `text` are Markdown."""

    title: str
    summary: str
    text: str | None = None

    def to_json(self) -> dict[str, str]:
        output = {
            "title": self.title,
            "summary": truncate_text(self.summary, CHECK_RUN_TEXT_MAX_CHARS),
        }
        if self.text is not None:
            output["text"] = truncate_text(self.text, CHECK_RUN_TEXT_MAX_CHARS)
        return output


@dataclass
class _InstallationToken:
    token: str = field(repr=False)
    expires_at_s: float


# gidgethub's exceptions carry only the error message; the raw body of the last
# failed response is kept here for the error excerpt. A ContextVar keeps concurrent
# calls in different tasks apart.
_error_body: ContextVar[bytes] = ContextVar("kubeci_github_error_body", default=b"")


class _RecordingGitHubAPI(gidgethub.aiohttp.GitHubAPI):
    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Mapping[str, str], bytes]:
        status, response_headers, response_body = await super()._request(method, url, headers, body)
        if status >= 300:
            _error_body.set(response_body[:4096])
        return status, response_headers, response_body


def rate_limit_wait_s(
    status: int, headers: Mapping[str, str], message: str, now_s: float
) -> float | None:
    """Return how long to wait when a response is a rate-limit rejection, else None.

    GitHub responds with 403 or 429. `retry-after` wins. An exhausted primary limit
    (`x-ratelimit-remaining: 0`) waits for `x-ratelimit-reset`, and a secondary limit
    without either waits one minute. `headers` must have lower-case names.
    https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api
    """
    if status not in (403, 429):
        return None
    retry_after = parse_retry_after(headers.get("retry-after"), now_s)
    if retry_after is not None:
        return retry_after
    if headers.get("x-ratelimit-remaining") == "0":
        until_reset = seconds_until_epoch(headers.get("x-ratelimit-reset"), now_s)
        return SECONDARY_LIMIT_WAIT_S if until_reset is None else until_reset
    if status == 429 or "rate limit" in message.lower():
        return SECONDARY_LIMIT_WAIT_S
    return None


def error_for_status(
    status: int, headers: Mapping[str, str], message: str, body: bytes | str, now_s: float
) -> ForgeError:
    """Build the ForgeError subclass that matches a GitHub error response."""
    lowered = {name.lower(): value for name, value in headers.items()}
    common: dict[str, Any] = {"forge": FORGE, "status": status, "headers": lowered, "body": body}
    wait_s = rate_limit_wait_s(status, lowered, message, now_s)
    if wait_s is not None:
        return ForgeRateLimited(message, retry_after_s=wait_s, **common)
    if status in (401, 403):
        return ForgeAuthError(message, **common)
    if status in (404, 410):
        return ForgeNotFound(message, **common)
    if status >= 500:
        return ForgeServerError(message, **common)
    return ForgeClientError(message, **common)


# Path segments that clients and servers resolve against the path before them.
_DOT_SEGMENTS = frozenset({".", ".."})


def _split_repository(repo: str) -> tuple[str, str]:
    owner, slash, name = repo.partition("/")
    if not slash or not owner or not name or "/" in name:
        raise ValueError(f"GitHub repository must be 'owner/name', got {repo!r}")
    if owner in _DOT_SEGMENTS or name in _DOT_SEGMENTS:
        raise ValueError(f"GitHub repository owner and name may not be '.' or '..', got {repo!r}")
    return owner, name


def _repo_url(repo: str, *segments: str | int, query: Mapping[str, str] | None = None) -> str:
    """Build an API path under /repos/OWNER/NAME with every segment percent-encoded.

    Raises ValueError when `repo` is not `owner/name` or a segment is empty, "." or "..":
    percent-encoding leaves dots as they are, and a URL parser would resolve them.
    """
    parts = [*_split_repository(repo), *(str(segment) for segment in segments)]
    for part in parts:
        if not part or part in _DOT_SEGMENTS:
            raise ValueError(f"invalid GitHub API path segment {part!r} in a request for {repo}")
    url = "/repos/" + "/".join(urllib.parse.quote(part, safe="") for part in parts)
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return url


def _parse_expiry(value: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ForgeResponseError(
            f"GitHub installation token has an unreadable expires_at {value!r}", forge=FORGE
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _require_object(data: Any, what: str) -> None:
    """Raise ForgeResponseError unless `data`, a decoded response, is a JSON object."""
    if isinstance(data, dict):
        return
    if data is None:
        problem = "the response body is empty or has no content type"
    elif isinstance(data, str):
        problem = f"the response is not JSON; it starts with {body_excerpt(data, 80)!r}"
    else:
        problem = f"the response is a JSON {type(data).__name__}, not an object"
    raise ForgeResponseError(f"GitHub {what}: {problem}", forge=FORGE)


def _decode_content(data: dict[str, Any], what: str) -> bytes:
    """Decode the base64 `content` of a contents or blob response."""
    encoding = data.get("encoding")
    if encoding != "base64":
        raise ForgeResponseError(f"GitHub {what}: unexpected encoding {encoding!r}", forge=FORGE)
    content = response_field(data, "content", str, forge=FORGE, what=what)
    # GitHub wraps the base64 text in lines, so drop whitespace and reject anything else
    # outside the base64 alphabet instead of skipping it.
    try:
        return base64.b64decode("".join(content.split()), validate=True)
    except binascii.Error as exc:
        raise ForgeResponseError(
            f"GitHub {what}: the content is not valid base64 ({exc})", forge=FORGE
        ) from exc


def _comment(data: Any, what: str) -> Comment:
    user = response_field(data, "user", dict, forge=FORGE, what=what)
    body = data.get("body")
    return Comment(
        id=response_field(data, "id", int, forge=FORGE, what=what),
        body=body if isinstance(body, str) else "",
        author=response_field(user, "login", str, forge=FORGE, what=what),
        author_is_bot=user.get("type") == "Bot",
    )


def _same_repository(head: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    if isinstance(head.get("id"), int) and isinstance(base.get("id"), int):
        return bool(head["id"] == base["id"])
    return bool(head.get("full_name") == base.get("full_name"))


def _pull_request(data: Any, what: str) -> PullRequest:
    head = response_field(data, "head", dict, forge=FORGE, what=what)
    base = response_field(data, "base", dict, forge=FORGE, what=what)
    base_repo = response_field(base, "repo", dict, forge=FORGE, what=what)
    head_repo = head.get("repo") if isinstance(head.get("repo"), dict) else None
    user = response_field(data, "user", dict, forge=FORGE, what=what)
    state = response_field(data, "state", str, forge=FORGE, what=what)
    raw_labels = data.get("labels")
    labels: list[Any] = raw_labels if isinstance(raw_labels, list) else []
    pr_state: PullRequestState = "open" if state == "open" else "closed"
    if data.get("merged") is True:
        pr_state = "merged"
    return PullRequest(
        number=response_field(data, "number", int, forge=FORGE, what=what),
        state=pr_state,
        head_sha=response_field(head, "sha", str, forge=FORGE, what=what),
        head_ref=response_field(head, "ref", str, forge=FORGE, what=what),
        base_ref=response_field(base, "ref", str, forge=FORGE, what=what),
        head_repository=head_repo.get("full_name") if head_repo else None,
        base_repository=response_field(base_repo, "full_name", str, forge=FORGE, what=what),
        author=response_field(user, "login", str, forge=FORGE, what=what),
        author_id=user.get("id") if isinstance(user.get("id"), int) else None,
        labels=tuple(
            label["name"]
            for label in labels
            if isinstance(label, dict) and isinstance(label.get("name"), str)
        ),
        draft=data.get("draft") is True,
        fork=head_repo is None or not _same_repository(head_repo, base_repo),
    )


class GitHubClient:
    """Calls the GitHub REST API for one GitHub (or GitHub Enterprise Server) host.

    `session` belongs to the caller, who closes it. `clock` returns Unix time in
    seconds; tests replace it to age installation tokens. `bot_login`, when set, is the
    login KubeCI's comments appear under, which is otherwise looked up.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        auth: TokenAuth | AppAuth,
        api_url: str = DEFAULT_API_URL,
        requester: str = "kubeci",
        request_timeout_s: float = 30.0,
        token_refresh_margin_s: float = TOKEN_REFRESH_MARGIN_S,
        clock: Callable[[], float] = time.time,
        bot_login: str = "",
    ) -> None:
        self._gh = _RecordingGitHubAPI(session, requester, base_url=api_url.rstrip("/"))
        self._login = bot_login or None
        self._auth = auth
        self._request_timeout_s = request_timeout_s
        self._refresh_margin_s = token_refresh_margin_s
        self._clock = clock
        self._installations: dict[str, int] = {}
        self._tokens: dict[int, _InstallationToken] = {}
        self._token_locks: dict[int, asyncio.Lock] = {}
        if isinstance(auth, AppAuth):
            self._app_jwt()

    @classmethod
    def from_settings(cls, settings: Settings, session: aiohttp.ClientSession) -> GitHubClient:
        """Build a client from KUBECI_GITHUB_* settings; raises ConfigError when unusable."""
        auth: TokenAuth | AppAuth
        if settings.github_app_id:
            auth = AppAuth(settings.github_app_id, _read_private_key(settings))
        elif settings.github_token:
            auth = TokenAuth(settings.github_token)
        else:
            raise ConfigError(
                "no GitHub credentials: set KUBECI_GITHUB_TOKEN, or KUBECI_GITHUB_APP_ID "
                "with KUBECI_GITHUB_PRIVATE_KEY_FILE"
            )
        return cls(
            session,
            auth=auth,
            api_url=settings.github_api_url,
            bot_login=settings.github_bot_login,
        )

    def remember_installation(self, repo: str, installation_id: int) -> None:
        """Record the app installation of `repo`, as a webhook reports it, to skip a lookup."""
        self._installations[repo.lower()] = installation_id

    # Authentication

    def _app_jwt(self) -> str:
        assert isinstance(self._auth, AppAuth)
        try:
            return gidgethub.apps.get_jwt(
                app_id=self._auth.app_id, private_key=self._auth.private_key
            )
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigError(
                "the GitHub App private key is not a PEM-encoded RSA private key; "
                "download a new key from the app's settings"
            ) from exc

    async def _installation_for(self, repo: str) -> int:
        cached = self._installations.get(repo.lower())
        if cached is not None:
            return cached
        what = f"installation lookup for {repo}"
        lookup = self._gh.getitem(_repo_url(repo, "installation"), jwt=self._app_jwt())
        try:
            data = await self._send(what, lookup)
        except ForgeNotFound as exc:
            raise _not_installed(repo, exc) from exc
        installation_id = response_field(data, "id", int, forge=FORGE, what=what)
        self._installations[repo.lower()] = installation_id
        return installation_id

    async def _installation_token(self, installation_id: int, stale_token: str | None) -> str:
        assert isinstance(self._auth, AppAuth)
        lock = self._token_locks.setdefault(installation_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(installation_id)
            fresh = (
                cached is not None and cached.expires_at_s - self._clock() > self._refresh_margin_s
            )
            if cached is not None and fresh and cached.token != stale_token:
                return cached.token
            what = f"installation token request for installation {installation_id}"
            data = await self._send(
                what,
                gidgethub.apps.get_installation_access_token(
                    self._gh,
                    installation_id=str(installation_id),
                    app_id=self._auth.app_id,
                    private_key=self._auth.private_key,
                ),
            )
            token = response_field(data, "token", str, forge=FORGE, what=what)
            expires_at = response_field(data, "expires_at", str, forge=FORGE, what=what)
            self._tokens[installation_id] = _InstallationToken(token, _parse_expiry(expires_at))
            log.info(
                "created a token for GitHub App installation %s, valid until %s",
                installation_id,
                expires_at,
                extra={"forge": FORGE},
            )
            return token

    async def _token_for(self, repo: str, stale_token: str | None = None) -> str:
        if isinstance(self._auth, TokenAuth):
            return self._auth.token
        installation_id = await self._installation_for(repo)
        try:
            return await self._installation_token(installation_id, stale_token)
        except ForgeNotFound as exc:
            # The app was uninstalled or reinstalled: look the installation up again next time.
            self._installations.pop(repo.lower(), None)
            raise _not_installed(repo, exc) from exc

    async def authenticated_login(self) -> str:
        """Return the login that KubeCI's comments appear under, looked up once.

        That is `bot_login` when set, else the token's user (`GET /user`), else for a
        GitHub App `<app slug>[bot]` (`GET /app`). Raises ForgeError when the lookup fails.
        """
        if self._login is not None:
            return self._login
        if isinstance(self._auth, TokenAuth):
            what = "lookup of the token's user"
            user = await self._send(what, self._gh.getitem("/user", oauth_token=self._auth.token))
            login = response_field(user, "login", str, forge=FORGE, what=what)
        else:
            what = "lookup of the GitHub App"
            app = await self._send(what, self._gh.getitem("/app", jwt=self._app_jwt()))
            login = response_field(app, "slug", str, forge=FORGE, what=what) + "[bot]"
        log.info("KubeCI comments on GitHub as %s", login, extra={"forge": FORGE})
        self._login = login
        return login

    # Requests

    async def _send(self, what: str, pending: Awaitable[T]) -> T:
        """Await one gidgethub call and translate its failures into ForgeError."""
        _error_body.set(b"")
        try:
            async with asyncio.timeout(self._request_timeout_s):
                return await pending
        except gidgethub.HTTPException as exc:
            status = int(exc.status_code)
            request_id = exc.headers.get("x-github-request-id", "unknown")
            message = f"GitHub {what} failed with {status}: {exc} (request id {request_id})"
            body = _error_body.get() or str(exc)
            raise error_for_status(status, exc.headers, message, body, self._clock()) from exc
        except TimeoutError as exc:
            message = f"GitHub {what} timed out after {self._request_timeout_s} s"
            raise ForgeConnectionError(message, forge=FORGE) from exc
        except aiohttp.ClientError as exc:
            detail = str(exc) or type(exc).__name__
            raise ForgeConnectionError(f"GitHub {what} failed: {detail}", forge=FORGE) from exc
        except (gidgethub.GitHubException, ValueError) as exc:
            raise ForgeResponseError(
                f"GitHub {what}: unreadable response: {exc}", forge=FORGE
            ) from exc

    async def _call(self, repo: str, what: str, request: Callable[[str], Awaitable[T]]) -> T:
        """Run `request(token)` for `repo`; with an app, retry once with a new token on 401."""
        token = await self._token_for(repo)
        try:
            return await self._send(what, request(token))
        except ForgeAuthError as exc:
            if not isinstance(self._auth, AppAuth) or exc.status != 401:
                raise
            log.warning(
                "GitHub rejected the installation token during %s; retrying with a new token",
                what,
                extra={"forge": FORGE, "repository": repo},
            )
            token = await self._token_for(repo, stale_token=token)
            return await self._send(what, request(token))

    def _get(self, url: str) -> Callable[[str], Awaitable[Any]]:
        return lambda token: self._gh.getitem(url, oauth_token=token, extra_headers=self._headers())

    def _post(self, url: str, data: Any) -> Callable[[str], Awaitable[Any]]:
        return lambda token: self._gh.post(
            url, data=data, oauth_token=token, extra_headers=self._headers()
        )

    def _patch(self, url: str, data: Any) -> Callable[[str], Awaitable[Any]]:
        return lambda token: self._gh.patch(
            url, data=data, oauth_token=token, extra_headers=self._headers()
        )

    def _delete(self, url: str) -> Callable[[str], Awaitable[None]]:
        return lambda token: self._gh.delete(url, oauth_token=token, extra_headers=self._headers())

    @staticmethod
    def _headers() -> dict[str, str]:
        return {"x-github-api-version": API_VERSION}

    async def _collect(self, url: str, token: str) -> list[Any]:
        items = self._gh.getiter(url, oauth_token=token, extra_headers=self._headers())
        return [item async for item in items]

    # Operations

    async def get_file(self, repo: str, path: str, sha: str) -> bytes | None:
        """Return the content of `path` at commit `sha`, or None when there is no such file.

        Files over 1 MB, which the contents API sends without content, are read
        through the Git blobs API (up to 100 MB). Raises ForgeClientError when `path`
        is a directory or a submodule.
        """
        what = f"file read of {path} at {sha} in {repo}"
        url = _repo_url(repo, "contents", *path.strip("/").split("/"), query={"ref": sha})
        try:
            data = await self._call(repo, what, self._get(url))
        except ForgeNotFound:
            log.info("%s: not found", what, extra={"forge": FORGE, "repository": repo})
            return None
        if isinstance(data, list):
            raise ForgeClientError(f"GitHub {what}: the path is a directory", forge=FORGE)
        _require_object(data, what)
        kind = data.get("type")
        if kind != "file":
            raise ForgeClientError(f"GitHub {what}: the path is a {kind}, not a file", forge=FORGE)
        if data.get("encoding") == "none":
            blob_sha = response_field(data, "sha", str, forge=FORGE, what=what)
            data = await self._call(
                repo, what, self._get(_repo_url(repo, "git", "blobs", blob_sha))
            )
            _require_object(data, what)
        return _decode_content(data, what)

    async def get_pull_request(self, repo: str, number: int) -> PullRequest:
        what = f"read of pull request #{number} in {repo}"
        data = await self._call(repo, what, self._get(_repo_url(repo, "pulls", number)))
        return _pull_request(data, what)

    async def create_status(
        self,
        repo: str,
        sha: str,
        state: StatusState,
        context: str,
        description: str,
        target_url: str | None = None,
    ) -> None:
        """Set the commit status `context` on `sha`, cutting the description to 140 chars."""
        data: dict[str, str] = {
            "state": _STATUS_STATES[state],
            "context": context,
            "description": truncate_text(description, STATUS_DESCRIPTION_MAX_CHARS),
        }
        if target_url:
            data["target_url"] = target_url
        what = f"status {context}={state} on {sha} in {repo}"
        await self._call(repo, what, self._post(_repo_url(repo, "statuses", sha), data))

    async def list_comments(self, repo: str, number: int) -> list[Comment]:
        """Return every comment of pull request `number`, oldest first, across all pages."""
        what = f"comment listing of #{number} in {repo}"
        url = _repo_url(repo, "issues", number, "comments", query={"per_page": "100"})
        items = await self._call(repo, what, lambda token: self._collect(url, token))
        return [_comment(item, what) for item in items]

    async def create_comment(self, repo: str, number: int, body: str) -> Comment:
        what = f"comment on #{number} in {repo}"
        url = _repo_url(repo, "issues", number, "comments")
        data = {"body": truncate_text(body, COMMENT_MAX_CHARS)}
        return _comment(await self._call(repo, what, self._post(url, data)), what)

    async def edit_comment(self, repo: str, comment_id: int, body: str) -> Comment:
        what = f"edit of comment {comment_id} in {repo}"
        url = _repo_url(repo, "issues", "comments", comment_id)
        data = {"body": truncate_text(body, COMMENT_MAX_CHARS)}
        return _comment(await self._call(repo, what, self._patch(url, data)), what)

    async def find_comment_by_marker(
        self, repo: str, number: int, marker: str, *, author: str | None = None
    ) -> Comment | None:
        """Return the oldest comment containing `marker` (by `author` if given), or None."""
        for comment in await self.list_comments(repo, number):
            if marker in comment.body and (author is None or comment.author == author):
                return comment
        return None

    async def create_check_run(
        self,
        repo: str,
        sha: str,
        name: str,
        *,
        status: CheckStatus = "queued",
        conclusion: CheckConclusion | None = None,
        details_url: str | None = None,
        external_id: str | None = None,
        output: CheckOutput | None = None,
    ) -> int:
        """Create a check run on `sha` and return its id. Needs GitHub App credentials."""
        data: dict[str, Any] = {"name": name, "head_sha": sha, "status": status}
        _add_check_fields(data, conclusion, details_url, external_id, output)
        what = f"check run {name} on {sha} in {repo}"
        created = await self._call(repo, what, self._post(_repo_url(repo, "check-runs"), data))
        return response_field(created, "id", int, forge=FORGE, what=what)

    async def update_check_run(
        self,
        repo: str,
        check_run_id: int,
        *,
        status: CheckStatus | None = None,
        conclusion: CheckConclusion | None = None,
        details_url: str | None = None,
        output: CheckOutput | None = None,
    ) -> None:
        data: dict[str, Any] = {}
        if status is not None:
            data["status"] = status
        _add_check_fields(data, conclusion, details_url, None, output)
        what = f"update of check run {check_run_id} in {repo}"
        url = _repo_url(repo, "check-runs", check_run_id)
        await self._call(repo, what, self._patch(url, data))

    async def get_collaborator_permission(self, repo: str, user: str) -> Permission:
        """Return the role of `user` in `repo`, or `none` for a user GitHub does not know.

        Custom repository roles report their base permission.
        """
        what = f"permission read of {user} in {repo}"
        url = _repo_url(repo, "collaborators", user, "permission")
        try:
            data = await self._call(repo, what, self._get(url))
        except ForgeNotFound:
            return "none"
        for key in ("role_name", "permission"):
            value = data.get(key) if isinstance(data, dict) else None
            if value in PERMISSIONS:
                permission: Permission = value
                return permission
        raise ForgeResponseError(f"GitHub {what}: no known permission in response", forge=FORGE)

    async def add_reaction(self, repo: str, comment_id: int, content: str) -> None:
        """React to a pull request comment. Adding the same reaction twice is harmless."""
        if content not in REACTIONS:
            raise ValueError(f"unknown GitHub reaction {content!r}; use one of {sorted(REACTIONS)}")
        what = f"reaction {content} to comment {comment_id} in {repo}"
        url = _repo_url(repo, "issues", "comments", comment_id, "reactions")
        await self._call(repo, what, self._post(url, {"content": content}))

    async def add_label(self, repo: str, number: int, label: str) -> None:
        what = f"label {label} on #{number} in {repo}"
        url = _repo_url(repo, "issues", number, "labels")
        await self._call(repo, what, self._post(url, {"labels": [label]}))

    async def remove_label(self, repo: str, number: int, label: str) -> None:
        """Remove `label` from #`number`. A label that is not there is not an error."""
        what = f"label removal of {label} from #{number} in {repo}"
        url = _repo_url(repo, "issues", number, "labels", label)
        try:
            await self._call(repo, what, self._delete(url))
        except ForgeNotFound:
            log.info("%s: label not present", what, extra={"forge": FORGE, "repository": repo})


def _not_installed(repo: str, cause: ForgeNotFound) -> ForgeAuthError:
    return ForgeAuthError(
        f"the GitHub App is not installed on {repo}; install it on the repository",
        forge=FORGE,
        status=cause.status,
        headers=cause.headers,
        body=cause.body,
    )


def _add_check_fields(
    data: dict[str, Any],
    conclusion: CheckConclusion | None,
    details_url: str | None,
    external_id: str | None,
    output: CheckOutput | None,
) -> None:
    if conclusion is not None:
        data["conclusion"] = conclusion
        data["status"] = "completed"
    if details_url:
        data["details_url"] = details_url
    if external_id is not None:
        data["external_id"] = external_id
    if output is not None:
        data["output"] = output.to_json()


def _read_private_key(settings: Settings) -> str:
    path = settings.github_private_key_file
    if not path:
        raise ConfigError(
            "KUBECI_GITHUB_APP_ID is set but KUBECI_GITHUB_PRIVATE_KEY_FILE is empty; "
            "set it to the path of the app's PEM private key"
        )
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"KUBECI_GITHUB_PRIVATE_KEY_FILE={path!r} cannot be read ({exc}); "
            "point it at the app's PEM private key"
        ) from exc
