from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.config import ConfigError, Settings
from bot.forges.errors import (
    ForgeAuthError,
    ForgeClientError,
    ForgeConnectionError,
    ForgeNotFound,
    ForgeRateLimited,
    ForgeResponseError,
    ForgeServerError,
)
from bot.forges.github import (
    AppAuth,
    CheckOutput,
    GitHubClient,
    TokenAuth,
    error_for_status,
    rate_limit_wait_s,
)
from bot.forges.models import truncate_text
from tests.fakes import Scripted, fixtures
from tests.fakes.github import FakeGitHub

REPO = "octo-org/widgets"
SHA = "c" * 40
APP_ID = "4242"
INSTALLATION = 31


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def client(fake_github: FakeGitHub, session: aiohttp.ClientSession) -> GitHubClient:
    auth = TokenAuth("ghp-test-token")
    return GitHubClient(session, auth=auth, api_url=fake_github.url, request_timeout_s=2)


class Clock:
    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app_client(
    fake_github: FakeGitHub,
    session: aiohttp.ClientSession,
    github_app_key: fixtures.RsaKeyPair,
    clock: Clock,
) -> GitHubClient:
    fake_github.set_app(APP_ID, github_app_key.public_pem)
    fake_github.add_installation(INSTALLATION, REPO)
    auth = AppAuth(APP_ID, github_app_key.private_pem)
    return GitHubClient(session, auth=auth, api_url=fake_github.url, clock=clock)


# Files


async def test_get_file_returns_content(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, ".kubeci.yml", "jobs: []  # ✓\n")
    assert await client.get_file(REPO, ".kubeci.yml", SHA) == "jobs: []  # ✓\n".encode()


async def test_get_file_reads_at_sha(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, ".kubeci.yml", "x")
    await client.get_file(REPO, ".kubeci.yml", SHA)
    assert fake_github.requests_to("contents.get")[0].query == {"ref": SHA}


async def test_get_file_missing_returns_none(client: GitHubClient) -> None:
    assert await client.get_file(REPO, ".kubeci.yml", SHA) is None


async def test_get_file_unicode_path(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, "ci/piplíne #1.yml", b"a: 1")
    assert await client.get_file(REPO, "ci/piplíne #1.yml", SHA) == b"a: 1"


async def test_get_file_large_read_from_blob(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.large_file_bytes = 16
    content = bytes(range(256)) * 8
    fake_github.add_file(REPO, SHA, "big.bin", content)
    assert await client.get_file(REPO, "big.bin", SHA) == content
    assert len(fake_github.requests_to("blobs.get")) == 1


async def test_get_file_empty(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, "empty.yml", b"")
    assert await client.get_file(REPO, "empty.yml", SHA) == b""


async def test_get_file_directory_rejected(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, "ci/a.yml", b"a")
    with pytest.raises(ForgeClientError, match="directory"):
        await client.get_file(REPO, "ci", SHA)


async def test_get_file_invalid_base64(fake_github: FakeGitHub, client: GitHubClient) -> None:
    content = {"type": "file", "encoding": "base64", "content": "!!!!bm90IGJhc2U2NA=="}
    fake_github.script("contents.get", Scripted(200, content))
    with pytest.raises(ForgeResponseError, match="not valid base64"):
        await client.get_file(REPO, ".kubeci.yml", SHA)


async def test_get_file_wrapped_base64(fake_github: FakeGitHub, client: GitHubClient) -> None:
    content = {"type": "file", "encoding": "base64", "content": "am9i\ncw==\n"}
    fake_github.script("contents.get", Scripted(200, content))
    assert await client.get_file(REPO, ".kubeci.yml", SHA) == b"jobs"


async def test_get_file_html_response(fake_github: FakeGitHub, client: GitHubClient) -> None:
    page = "<html><body>Unicorn! Something went wrong</body></html>"
    fake_github.script("contents.get", Scripted(200, page, {"Content-Type": "text/html"}))
    with pytest.raises(ForgeResponseError, match="not JSON; it starts with '<html><body>Unicorn"):
        await client.get_file(REPO, ".kubeci.yml", SHA)


async def test_get_file_empty_response(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.script("contents.get", Scripted(200, b"", {"Content-Type": "application/json"}))
    with pytest.raises(ForgeResponseError, match="response body is empty"):
        await client.get_file(REPO, ".kubeci.yml", SHA)


async def test_get_file_blob_not_json(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.large_file_bytes = 4
    fake_github.add_file(REPO, SHA, "big.yml", b"jobs: []")
    fake_github.script(
        "blobs.get", Scripted(200, "upstream timeout", {"Content-Type": "text/plain"})
    )
    with pytest.raises(ForgeResponseError, match="it starts with 'upstream timeout'"):
        await client.get_file(REPO, "big.yml", SHA)


async def test_bad_repository_name_rejected(client: GitHubClient) -> None:
    with pytest.raises(ValueError, match="owner/name"):
        await client.get_file("widgets", ".kubeci.yml", SHA)


@pytest.mark.parametrize("repo", ["octo-org/..", "../widgets", "./widgets"])
async def test_dot_repository_rejected(
    fake_github: FakeGitHub, client: GitHubClient, repo: str
) -> None:
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        await client.get_file(repo, ".kubeci.yml", SHA)
    assert fake_github.requests == []


async def test_dot_path_segment_rejected(fake_github: FakeGitHub, client: GitHubClient) -> None:
    with pytest.raises(ValueError, match=r"invalid GitHub API path segment '\.\.'"):
        await client.remove_label(REPO, 1, "..")
    assert fake_github.requests == []


# Pull requests


async def test_get_pull_request_fields(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_pull_request(REPO, 7, head_sha=SHA, labels=("bug",), draft=True)
    pr = await client.get_pull_request(REPO, 7)
    assert pr.number == 7
    assert pr.state == "open"
    assert pr.head_sha == SHA
    assert pr.head_ref == "feature"
    assert pr.base_ref == "main"
    assert pr.author == "alice"
    assert pr.labels == ("bug",)
    assert pr.draft is True
    assert pr.fork is False
    assert pr.head_repository == REPO


async def test_get_pull_request_from_fork(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_pull_request(REPO, 8, head_sha=SHA, head_repo="mallory/widgets")
    pr = await client.get_pull_request(REPO, 8)
    assert pr.fork is True
    assert pr.head_repository == "mallory/widgets"


async def test_get_pull_request_deleted_fork(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_pull_request(REPO, 9, head_sha=SHA, fork_deleted=True)
    pr = await client.get_pull_request(REPO, 9)
    assert pr.fork is True
    assert pr.head_repository is None


async def test_get_pull_request_merged(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_pull_request(REPO, 10, head_sha=SHA, state="closed", merged=True)
    assert (await client.get_pull_request(REPO, 10)).state == "merged"


async def test_get_pull_request_missing(client: GitHubClient) -> None:
    with pytest.raises(ForgeNotFound) as caught:
        await client.get_pull_request(REPO, 404)
    assert caught.value.status == 404
    assert "Not Found" in caught.value.body


# Statuses


async def test_create_status_sent(fake_github: FakeGitHub, client: GitHubClient) -> None:
    await client.create_status(
        REPO, SHA, "success", "kubeci/build", "Passed", "http://127.0.0.1/runs/1"
    )
    assert fake_github.statuses == [
        {
            "repo": REPO,
            "sha": SHA,
            "state": "success",
            "context": "kubeci/build",
            "description": "Passed",
            "target_url": "http://127.0.0.1/runs/1",
        }
    ]


@pytest.mark.parametrize(
    ("state", "sent"),
    [("running", "pending"), ("canceled", "error"), ("failure", "failure"), ("error", "error")],
)
async def test_create_status_state_mapped(
    fake_github: FakeGitHub, client: GitHubClient, state: str, sent: str
) -> None:
    await client.create_status(REPO, SHA, state, "kubeci/build", "x")  # type: ignore[arg-type]
    assert fake_github.statuses[0]["state"] == sent


async def test_create_status_without_target_url(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    await client.create_status(REPO, SHA, "pending", "kubeci/build", "Queued")
    assert "target_url" not in fake_github.statuses[0]


async def test_create_status_long_description_truncated(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    await client.create_status(REPO, SHA, "failure", "kubeci/build", "é" * 300)
    sent = fake_github.statuses[0]["description"]
    assert len(sent) == 140
    assert sent.endswith("…")


async def test_create_status_every_request_recorded(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    for state in ("pending", "running", "success"):
        await client.create_status(REPO, SHA, state, "kubeci/build", state)  # type: ignore[arg-type]
    sent = [request.json()["description"] for request in fake_github.requests_to("statuses.create")]
    assert sent == ["pending", "running", "success"]


# Truncation


def test_truncate_short_text_unchanged() -> None:
    assert truncate_text("ok", 140) == "ok"


def test_truncate_keeps_combining_mark_with_base() -> None:
    text = "a" * 8 + "e\u0301" + "z" * 10
    assert truncate_text(text, 10) == "a" * 8 + "…"


def test_truncate_keeps_emoji_sequence_whole() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    result = truncate_text("ab" + family + "cdef", 6)
    assert not result.removesuffix("…").endswith("\u200d")
    assert len(result) <= 6


def test_truncate_keeps_flag_pair_whole() -> None:
    flag = "\U0001f1eb\U0001f1f7"
    assert truncate_text("abc" + flag + "defgh", 5) == "abc…"


def test_truncate_result_fits_limit() -> None:
    for limit in range(1, 30):
        assert len(truncate_text("ünïcödé " * 10, limit)) <= limit


# Comments


async def test_list_comments_follows_pages(fake_github: FakeGitHub, client: GitHubClient) -> None:
    for index in range(130):
        fake_github.add_comment(REPO, 7, f"comment {index}")
    comments = await client.list_comments(REPO, 7)
    assert [comment.body for comment in comments] == [f"comment {i}" for i in range(130)]
    assert len(fake_github.requests_to("comments.list")) == 2


async def test_create_comment_returns_comment(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    comment = await client.create_comment(REPO, 7, "<!-- kubeci -->\nAll green")
    assert comment.body == "<!-- kubeci -->\nAll green"
    assert comment.author_is_bot is True
    assert fake_github.comments[(REPO, 7)][0]["id"] == comment.id


async def test_authenticated_login_of_token(fake_github: FakeGitHub, client: GitHubClient) -> None:
    assert await client.authenticated_login() == fake_github.bot_user["login"]
    assert await client.authenticated_login() == fake_github.bot_user["login"]
    assert len(fake_github.requests_to("user.get")) == 1


async def test_authenticated_login_of_app(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    fake_github.app_slug = "ci-helper"
    assert await app_client.authenticated_login() == "ci-helper[bot]"
    assert fake_github.requests_to("user.get") == []


async def test_authenticated_login_configured(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    auth = TokenAuth("ghp-test-token")
    client = GitHubClient(session, auth=auth, api_url=fake_github.url, bot_login="ci-machine")
    assert await client.authenticated_login() == "ci-machine"
    assert fake_github.requests == []


async def test_authenticated_login_failure_not_cached(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.script("user.get", Scripted(502))
    with pytest.raises(ForgeServerError):
        await client.authenticated_login()
    assert await client.authenticated_login() == fake_github.bot_user["login"]


async def test_edit_comment_changes_body(fake_github: FakeGitHub, client: GitHubClient) -> None:
    posted = fake_github.add_comment(REPO, 7, "old")
    edited = await client.edit_comment(REPO, posted["id"], "new")
    assert edited.body == "new"
    assert fake_github.comments[(REPO, 7)][0]["body"] == "new"


async def test_find_comment_by_marker(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.add_comment(REPO, 7, "hello")
    quoted = fake_github.add_comment(REPO, 7, "> <!-- kubeci:summary -->", author="bob")
    ours = fake_github.add_comment(REPO, 7, "<!-- kubeci:summary -->", author="kubeci[bot]")
    any_author = await client.find_comment_by_marker(REPO, 7, "<!-- kubeci:summary -->")
    by_bot = await client.find_comment_by_marker(
        REPO, 7, "<!-- kubeci:summary -->", author="kubeci[bot]"
    )
    assert any_author is not None
    assert any_author.id == quoted["id"]
    assert by_bot is not None
    assert by_bot.id == ours["id"]


async def test_find_comment_by_marker_absent(client: GitHubClient) -> None:
    assert await client.find_comment_by_marker(REPO, 7, "<!-- kubeci -->") is None


# Check runs


async def test_create_check_run_with_app(fake_github: FakeGitHub, app_client: GitHubClient) -> None:
    output = CheckOutput("Build", "s" * 70000, "t" * 70000)
    run_id = await app_client.create_check_run(
        REPO, SHA, "kubeci/build", status="in_progress", output=output
    )
    sent = fake_github.check_runs[run_id]
    assert sent["head_sha"] == SHA
    assert sent["status"] == "in_progress"
    assert len(sent["output"]["summary"]) == 65535
    assert len(sent["output"]["text"]) == 65535


async def test_update_check_run_completes(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    run_id = await app_client.create_check_run(REPO, SHA, "kubeci/build")
    await app_client.update_check_run(
        REPO, run_id, conclusion="success", details_url="http://127.0.0.1/runs/1"
    )
    assert fake_github.check_runs[run_id]["status"] == "completed"
    assert fake_github.check_runs[run_id]["conclusion"] == "success"


async def test_check_run_with_token_rejected(client: GitHubClient) -> None:
    with pytest.raises(ForgeAuthError, match="GitHub App"):
        await client.create_check_run(REPO, SHA, "kubeci/build")


# Permissions, reactions, labels


@pytest.mark.parametrize("role", ["admin", "maintain", "write", "triage", "read", "none"])
async def test_collaborator_permission(
    fake_github: FakeGitHub, client: GitHubClient, role: str
) -> None:
    fake_github.set_permission(REPO, "carol", role)
    assert await client.get_collaborator_permission(REPO, "carol") == role


async def test_collaborator_permission_unknown_user(client: GitHubClient) -> None:
    assert await client.get_collaborator_permission(REPO, "nobody") == "none"


async def test_collaborator_custom_role_uses_base(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.set_permission(REPO, "carol", "security-reviewer", base="write")
    assert await client.get_collaborator_permission(REPO, "carol") == "write"


async def test_add_reaction_twice(fake_github: FakeGitHub, client: GitHubClient) -> None:
    await client.add_reaction(REPO, 55, "+1")
    await client.add_reaction(REPO, 55, "+1")
    assert fake_github.reactions == [{"comment_id": 55, "content": "+1"}]


async def test_add_reaction_unknown_content(client: GitHubClient) -> None:
    with pytest.raises(ValueError, match="unknown GitHub reaction"):
        await client.add_reaction(REPO, 55, "thumbsup")


async def test_add_and_remove_label(fake_github: FakeGitHub, client: GitHubClient) -> None:
    await client.add_label(REPO, 7, "ok-to-test")
    assert fake_github.labels[(REPO, 7)] == ["ok-to-test"]
    await client.remove_label(REPO, 7, "ok-to-test")
    assert fake_github.labels[(REPO, 7)] == []


async def test_remove_absent_label_ignored(fake_github: FakeGitHub, client: GitHubClient) -> None:
    await client.remove_label(REPO, 7, "needs review/✓")
    assert fake_github.requests_to("labels.remove")[0].path.endswith("/labels/needs review/✓")


# GitHub App tokens


async def test_app_token_created_once(fake_github: FakeGitHub, app_client: GitHubClient) -> None:
    fake_github.add_file(REPO, SHA, "a", "1")
    for _ in range(3):
        await app_client.get_file(REPO, "a", SHA)
    assert len(fake_github.requests_to("installation.get")) == 1
    assert len(fake_github.requests_to("installation_tokens.create")) == 1


async def test_app_token_request_signed_with_app_key(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    await app_client.get_file(REPO, "a", SHA)
    request = fake_github.requests_to("installation_tokens.create")[0]
    assert request.path == f"/app/installations/{INSTALLATION}/access_tokens"
    assert request.headers["Authorization"].lower().startswith("bearer ")


async def test_app_remembered_installation_skips_lookup(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    app_client.remember_installation(REPO, INSTALLATION)
    await app_client.get_file(REPO, "a", SHA)
    assert fake_github.requests_to("installation.get") == []


async def test_app_token_refreshed_before_expiry(
    fake_github: FakeGitHub, app_client: GitHubClient, clock: Clock
) -> None:
    await app_client.get_file(REPO, "a", SHA)
    clock.now_s += fake_github.token_ttl_s - 299
    await app_client.get_file(REPO, "a", SHA)
    assert len(fake_github.requests_to("installation_tokens.create")) == 2


async def test_app_token_kept_until_margin(
    fake_github: FakeGitHub, app_client: GitHubClient, clock: Clock
) -> None:
    await app_client.get_file(REPO, "a", SHA)
    clock.now_s += fake_github.token_ttl_s - 310
    await app_client.get_file(REPO, "a", SHA)
    assert len(fake_github.requests_to("installation_tokens.create")) == 1


async def test_app_token_refreshed_after_401(
    fake_github: FakeGitHub, app_client: GitHubClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake_github.add_file(REPO, SHA, "a", "1")
    await app_client.get_file(REPO, "a", SHA)
    fake_github.revoke_tokens()
    with caplog.at_level(logging.WARNING, logger="bot.forges.github"):
        assert await app_client.get_file(REPO, "a", SHA) == b"1"
    assert len(fake_github.requests_to("installation_tokens.create")) == 2
    assert "retrying with a new token" in caplog.text


async def test_app_401_retried_only_once(fake_github: FakeGitHub, app_client: GitHubClient) -> None:
    unauthorized = Scripted(401, {"message": "Bad credentials"})
    fake_github.script("pulls.get", unauthorized, unauthorized)
    with pytest.raises(ForgeAuthError):
        await app_client.get_pull_request(REPO, 7)
    assert len(fake_github.requests_to("pulls.get")) == 2


async def test_app_concurrent_calls_share_token(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    app_client.remember_installation(REPO, INSTALLATION)
    await asyncio.gather(*(app_client.get_file(REPO, "a", SHA) for _ in range(5)))
    assert len(fake_github.requests_to("installation_tokens.create")) == 1


async def test_app_not_installed(fake_github: FakeGitHub, app_client: GitHubClient) -> None:
    with pytest.raises(ForgeAuthError, match="not installed"):
        await app_client.get_file("someone/else", "a", SHA)


async def test_app_stale_installation_looked_up_again(
    fake_github: FakeGitHub, app_client: GitHubClient
) -> None:
    app_client.remember_installation(REPO, 999)
    with pytest.raises(ForgeAuthError, match="not installed"):
        await app_client.get_file(REPO, "a", SHA)
    assert await app_client.get_file(REPO, "a", SHA) is None
    assert len(fake_github.requests_to("installation.get")) == 1


async def test_app_wrong_key_rejected(
    fake_github: FakeGitHub, session: aiohttp.ClientSession, github_app_key: fixtures.RsaKeyPair
) -> None:
    other_key = fixtures.make_rsa_key_pair()
    fake_github.set_app(APP_ID, other_key.public_pem)
    fake_github.add_installation(INSTALLATION, REPO)
    auth = AppAuth(APP_ID, github_app_key.private_pem)
    client = GitHubClient(session, auth=auth, api_url=fake_github.url)
    with pytest.raises(ForgeAuthError, match="could not be decoded"):
        await client.get_file(REPO, "a", SHA)


async def test_app_invalid_private_key_rejected(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match="PEM"):
        GitHubClient(session, auth=AppAuth(APP_ID, "not a key"))


# Errors and rate limits


async def test_rate_limited_429_retry_after(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.script("pulls.get", Scripted(429, {"message": "Too many"}, {"Retry-After": "7"}))
    with pytest.raises(ForgeRateLimited) as caught:
        await client.get_pull_request(REPO, 7)
    assert caught.value.retry_after_s == 7
    assert caught.value.status == 429
    assert caught.value.transient is True


async def test_secondary_limit_with_retry_after(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.secondary_limit("statuses.create", retry_after_s=30)
    with pytest.raises(ForgeRateLimited) as caught:
        await client.create_status(REPO, SHA, "success", "kubeci/build", "ok")
    assert caught.value.retry_after_s == 30


async def test_secondary_limit_without_retry_after(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.secondary_limit("comments.create")
    with pytest.raises(ForgeRateLimited) as caught:
        await client.create_comment(REPO, 7, "hi")
    assert caught.value.retry_after_s == 60
    assert "secondary rate limit" in caught.value.body


async def test_primary_limit_waits_for_reset(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.primary_limit("pulls.get", reset_in_s=120)
    with pytest.raises(ForgeRateLimited) as caught:
        await client.get_pull_request(REPO, 7)
    assert 100 <= caught.value.retry_after_s <= 121


async def test_server_error_mapped(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.script("pulls.get", Scripted(502))
    with pytest.raises(ForgeServerError) as caught:
        await client.get_pull_request(REPO, 7)
    assert caught.value.status == 502
    assert caught.value.transient is True
    assert "x-github-request-id" in caught.value.headers
    assert "request id" in str(caught.value)
    assert "Bad Gateway" in caught.value.body


async def test_forbidden_without_limit_is_auth_error(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    message = {"message": "Resource not accessible by integration"}
    fake_github.script("statuses.create", Scripted(403, message))
    with pytest.raises(ForgeAuthError) as caught:
        await client.create_status(REPO, SHA, "success", "kubeci/build", "ok")
    assert caught.value.transient is False


async def test_bad_token_is_auth_error(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    client = GitHubClient(session, auth=TokenAuth("wrong"), api_url=fake_github.url)
    with pytest.raises(ForgeAuthError) as caught:
        await client.get_pull_request(REPO, 7)
    assert caught.value.status == 401
    assert len(fake_github.requests_to("pulls.get")) == 1


async def test_validation_error_is_client_error(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.script("labels.add", Scripted(422, {"message": "Validation Failed"}))
    with pytest.raises(ForgeClientError) as caught:
        await client.add_label(REPO, 7, "x")
    assert caught.value.status == 422


async def test_slow_answer_times_out(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    client = GitHubClient(
        session, auth=TokenAuth("ghp-test-token"), api_url=fake_github.url, request_timeout_s=0.1
    )
    fake_github.script("pulls.get", Scripted(delay_s=0.5))
    with pytest.raises(ForgeConnectionError, match="timed out"):
        await client.get_pull_request(REPO, 7)


async def test_refused_connection_mapped(session: aiohttp.ClientSession) -> None:
    stopped = FakeGitHub()
    url = await stopped.start()
    await stopped.stop()
    client = GitHubClient(session, auth=TokenAuth("t"), api_url=url, request_timeout_s=2)
    with pytest.raises(ForgeConnectionError) as caught:
        await client.get_pull_request(REPO, 7)
    assert caught.value.status is None


def test_retry_after_http_date() -> None:
    now_s = 1_700_000_000.0
    headers = {"retry-after": "Tue, 14 Nov 2023 22:15:20 GMT"}
    assert rate_limit_wait_s(429, headers, "", now_s) == 120.0


def test_exhausted_limit_after_reset_waits_zero() -> None:
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "100"}
    error = error_for_status(403, headers, "API rate limit exceeded", b"", now_s=200.0)
    assert isinstance(error, ForgeRateLimited)
    assert error.retry_after_s == 0.0


def test_gone_is_not_found() -> None:
    assert isinstance(error_for_status(410, {}, "gone", b"", now_s=0.0), ForgeNotFound)


# Settings


async def test_from_settings_token(session: aiohttp.ClientSession) -> None:
    settings = Settings(github_token="t", github_api_url="http://127.0.0.1:1")
    assert isinstance(GitHubClient.from_settings(settings, session), GitHubClient)


async def test_from_settings_without_credentials(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match="KUBECI_GITHUB_TOKEN"):
        GitHubClient.from_settings(Settings(), session)


async def test_from_settings_unreadable_key(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    settings = Settings(github_app_id="1", github_private_key_file=str(tmp_path / "none.pem"))
    with pytest.raises(ConfigError, match="cannot be read"):
        GitHubClient.from_settings(settings, session)


async def test_from_settings_app_key_file(
    session: aiohttp.ClientSession, tmp_path: Path, github_app_key: fixtures.RsaKeyPair
) -> None:
    key_file = tmp_path / "app.pem"
    key_file.write_text(github_app_key.private_pem)
    settings = Settings(github_app_id=APP_ID, github_private_key_file=str(key_file))
    assert isinstance(GitHubClient.from_settings(settings, session), GitHubClient)
