from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bot.config import ConfigError, Settings
from bot.forges.errors import (
    ForgeAuthError,
    ForgeClientError,
    ForgeConnectionError,
    ForgeNotFound,
    ForgeRateLimited,
    ForgeServerError,
)
from bot.forges.gitlab import GitLabClient
from tests.fakes import Scripted
from tests.fakes.gitlab import FakeGitLab

PROJECT = 42
PATH = "acme/widgets"
SHA = "c" * 40


@pytest.fixture
def gitlab_fake(fake_gitlab: FakeGitLab) -> FakeGitLab:
    fake_gitlab.add_project(PROJECT, PATH)
    fake_gitlab.add_merge_request(PROJECT, 3, sha=SHA, labels=("backend",))
    return fake_gitlab


def make_client(fake: FakeGitLab, token: str = "glpat-test-token", **kwargs: float) -> GitLabClient:
    options = {"timeout_s": 2.0, **kwargs}
    return GitLabClient(fake.url, token, **options)  # type: ignore[arg-type]


@pytest.fixture
def client(gitlab_fake: FakeGitLab) -> Iterator[GitLabClient]:
    gitlab_client = make_client(gitlab_fake)
    yield gitlab_client
    gitlab_client.close()


# Files


async def test_get_file_returns_content(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.add_file(PROJECT, SHA, ".kubeci.yml", "jobs: []  # ✓\n")
    assert await client.get_file(PROJECT, ".kubeci.yml", SHA) == "jobs: []  # ✓\n".encode()


async def test_get_file_reads_at_sha(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.add_file(PROJECT, SHA, ".kubeci.yml", "x")
    await client.get_file(PROJECT, ".kubeci.yml", SHA)
    assert gitlab_fake.requests_to("files.raw")[0].query["ref"] == SHA


async def test_get_file_missing_returns_none(client: GitLabClient) -> None:
    assert await client.get_file(PROJECT, ".kubeci.yml", SHA) is None


async def test_get_file_by_project_path(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.add_file(PROJECT, SHA, "ci/pípeline.yml", b"a: 1")
    assert await client.get_file(PATH, "ci/pípeline.yml", SHA) == b"a: 1"


async def test_get_file_dot_project_rejected(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        await client.get_file("acme/..", ".kubeci.yml", SHA)
    assert gitlab_fake.requests == []


async def test_get_file_unknown_project_returns_none(client: GitLabClient) -> None:
    assert await client.get_file("acme/other", ".kubeci.yml", SHA) is None


# Merge requests


async def test_get_merge_request_fields(client: GitLabClient) -> None:
    mr = await client.get_merge_request(PROJECT, 3)
    assert mr.number == 3
    assert mr.state == "open"
    assert mr.head_sha == SHA
    assert mr.head_ref == "feature"
    assert mr.base_ref == "main"
    assert mr.author == "alice"
    assert mr.author_id == 7
    assert mr.labels == ("backend",)
    assert mr.fork is False


async def test_get_merge_request_from_fork(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.add_merge_request(PROJECT, 4, sha=SHA, source_project_id=77)
    mr = await client.get_merge_request(PROJECT, 4)
    assert mr.fork is True
    assert mr.head_repository == "77"


async def test_get_merge_request_merged(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.add_merge_request(PROJECT, 5, sha=SHA, state="merged")
    assert (await client.get_merge_request(PROJECT, 5)).state == "merged"


async def test_get_merge_request_missing(client: GitLabClient) -> None:
    with pytest.raises(ForgeNotFound) as caught:
        await client.get_merge_request(PROJECT, 404)
    assert caught.value.status == 404
    assert "404 Not found" in caught.value.body


# Statuses


async def test_create_status_sent(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    await client.create_status(
        PROJECT, SHA, "running", "kubeci/build", "Running", "http://127.0.0.1/runs/1", ref="main"
    )
    assert gitlab_fake.statuses == [
        {
            "project_id": PROJECT,
            "sha": SHA,
            "state": "running",
            "name": "kubeci/build",
            "description": "Running",
            "target_url": "http://127.0.0.1/runs/1",
            "ref": "main",
        }
    ]


@pytest.mark.parametrize(
    ("state", "sent"),
    [("failure", "failed"), ("error", "failed"), ("canceled", "canceled"), ("success", "success")],
)
async def test_create_status_state_mapped(
    gitlab_fake: FakeGitLab, client: GitLabClient, state: str, sent: str
) -> None:
    await client.create_status(PROJECT, SHA, state, "kubeci/build", "x")  # type: ignore[arg-type]
    assert gitlab_fake.statuses[0]["state"] == sent


async def test_create_status_lifecycle_accepted(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    for state in ("pending", "running", "success", "pending"):
        await client.create_status(PROJECT, SHA, state, "kubeci/build", state)  # type: ignore[arg-type]
    assert [status["state"] for status in gitlab_fake.statuses] == [
        "pending",
        "running",
        "success",
        "pending",
    ]


async def test_create_status_repeated_running_not_sent(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    await client.create_status(PROJECT, SHA, "running", "kubeci/build", "Running")
    await client.create_status(PROJECT, SHA, "running", "kubeci/build", "Still running")
    assert len(gitlab_fake.requests_to("statuses.create")) == 1


async def test_create_status_transition_rejection_tolerated(gitlab_fake: FakeGitLab) -> None:
    first, second = make_client(gitlab_fake), make_client(gitlab_fake)
    await first.create_status(PROJECT, SHA, "running", "kubeci/build", "Running")
    await second.create_status(PROJECT, SHA, "running", "kubeci/build", "Running")
    await second.create_status(PROJECT, SHA, "pending", "kubeci/build", "Queued")
    rejected = gitlab_fake.requests_to("statuses.create")[1:]
    assert len(rejected) == 2
    assert len(gitlab_fake.statuses) == 1
    first.close()
    second.close()


async def test_create_status_other_400_raised(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.script("statuses.create", Scripted(400, {"message": "400 Bad request - sha"}))
    with pytest.raises(ForgeClientError) as caught:
        await client.create_status(PROJECT, SHA, "success", "kubeci/build", "ok")
    assert caught.value.status == 400


async def test_create_status_description_truncated(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    await client.create_status(PROJECT, SHA, "failure", "kubeci/build", "ü" * 400)
    description = gitlab_fake.statuses[0]["description"]
    assert len(description) == 255
    assert description.endswith("…")


# Notes


async def test_list_notes_follows_pages(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    for index in range(130):
        gitlab_fake.add_note(PROJECT, 3, f"note {index}")
    notes = await client.list_notes(PROJECT, 3)
    assert [note.body for note in notes] == [f"note {i}" for i in range(130)]
    assert len(gitlab_fake.requests_to("notes.list")) == 2


async def test_create_note_returns_note(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    note = await client.create_note(PROJECT, 3, "<!-- kubeci -->\nAll green")
    assert note.body == "<!-- kubeci -->\nAll green"
    assert note.author == gitlab_fake.bot_user["username"]
    assert gitlab_fake.notes[(PROJECT, 3)][0]["id"] == note.id


async def test_edit_note_changes_body(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    posted = gitlab_fake.add_note(PROJECT, 3, "old")
    edited = await client.edit_note(PROJECT, 3, posted["id"], "new")
    assert edited.body == "new"
    assert gitlab_fake.notes[(PROJECT, 3)][0]["body"] == "new"


async def test_find_note_by_marker_skips_system_notes(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.add_note(PROJECT, 3, "mentioned <!-- kubeci:summary -->", system=True)
    ours = gitlab_fake.add_note(PROJECT, 3, "<!-- kubeci:summary -->", author="kubeci")
    found = await client.find_note_by_marker(PROJECT, 3, "<!-- kubeci:summary -->")
    assert found is not None
    assert found.id == ours["id"]


async def test_find_note_by_marker_filters_author(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.add_note(PROJECT, 3, "<!-- kubeci -->", author="mallory")
    found = await client.find_note_by_marker(PROJECT, 3, "<!-- kubeci -->", author="kubeci")
    assert found is None


async def test_authenticated_username_cached(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    assert await client.authenticated_username() == gitlab_fake.bot_user["username"]
    assert await client.authenticated_username() == gitlab_fake.bot_user["username"]
    assert len(gitlab_fake.requests_to("user.get")) == 1


async def test_authenticated_username_bad_token(gitlab_fake: FakeGitLab) -> None:
    client = make_client(gitlab_fake, token="glpat-wrong")
    try:
        with pytest.raises(ForgeAuthError):
            await client.authenticated_username()
    finally:
        client.close()


# Members, award emoji, labels


async def test_access_level_read(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.set_member(PROJECT, 7, 40)
    assert await client.get_access_level(PROJECT, 7) == 40


async def test_access_level_of_non_member(client: GitLabClient) -> None:
    assert await client.get_access_level(PROJECT, 8) == 0


@pytest.mark.parametrize(("level", "expected"), [(20, False), (30, True), (50, True)])
async def test_write_access_from_developer(
    gitlab_fake: FakeGitLab, client: GitLabClient, level: int, expected: bool
) -> None:
    gitlab_fake.set_member(PROJECT, 7, level)
    assert await client.has_write_access(PROJECT, 7) is expected


async def test_award_emoji_twice(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    note = gitlab_fake.add_note(PROJECT, 3, "/retest")
    await client.award_emoji(PROJECT, 3, note["id"], "eyes")
    await client.award_emoji(PROJECT, 3, note["id"], "eyes")
    assert len(gitlab_fake.award_emoji) == 1


async def test_award_emoji_on_missing_note(client: GitLabClient) -> None:
    with pytest.raises(ForgeNotFound):
        await client.award_emoji(PROJECT, 3, 1, "eyes")


async def test_add_and_remove_label(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    await client.add_label(PROJECT, 3, "ok-to-test")
    assert gitlab_fake.merge_requests[(PROJECT, 3)]["labels"] == ["backend", "ok-to-test"]
    await client.remove_label(PROJECT, 3, "ok-to-test")
    assert gitlab_fake.merge_requests[(PROJECT, 3)]["labels"] == ["backend"]


async def test_label_with_comma_rejected(client: GitLabClient) -> None:
    with pytest.raises(ValueError, match="comma"):
        await client.add_label(PROJECT, 3, "a,b")


# Errors


async def test_bad_token_is_auth_error(gitlab_fake: FakeGitLab) -> None:
    client = make_client(gitlab_fake, token="wrong")
    with pytest.raises(ForgeAuthError) as caught:
        await client.get_merge_request(PROJECT, 3)
    assert caught.value.status == 401
    client.close()


async def test_rate_limited_not_retried_inside(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.rate_limit("merge_requests.get", retry_after_s=7)
    with pytest.raises(ForgeRateLimited) as caught:
        await client.get_merge_request(PROJECT, 3)
    assert caught.value.retry_after_s == 7
    assert caught.value.headers["ratelimit-remaining"] == "0"
    assert len(gitlab_fake.requests_to("merge_requests.get")) == 1


async def test_rate_limited_without_retry_after_uses_reset(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.rate_limit("notes.create")
    with pytest.raises(ForgeRateLimited) as caught:
        await client.create_note(PROJECT, 3, "hi")
    assert 50 <= caught.value.retry_after_s <= 61


async def test_server_error_not_retried_inside(
    gitlab_fake: FakeGitLab, client: GitLabClient
) -> None:
    gitlab_fake.script("merge_requests.get", Scripted(502, "<html>Bad Gateway</html>"))
    with pytest.raises(ForgeServerError) as caught:
        await client.get_merge_request(PROJECT, 3)
    assert caught.value.status == 502
    assert caught.value.transient is True
    assert "Bad Gateway" in caught.value.body
    assert len(gitlab_fake.requests_to("merge_requests.get")) == 1


async def test_forbidden_is_auth_error(gitlab_fake: FakeGitLab, client: GitLabClient) -> None:
    gitlab_fake.script("statuses.create", Scripted(403, {"message": "403 Forbidden"}))
    with pytest.raises(ForgeAuthError):
        await client.create_status(PROJECT, SHA, "success", "kubeci/build", "ok")


async def test_slow_request_times_out(gitlab_fake: FakeGitLab) -> None:
    client = make_client(gitlab_fake, timeout_s=0.2)
    gitlab_fake.script("merge_requests.get", Scripted(delay_s=0.5))
    with pytest.raises(ForgeConnectionError) as caught:
        await client.get_merge_request(PROJECT, 3)
    assert caught.value.status is None
    client.close()


async def test_slow_operation_hits_call_timeout(gitlab_fake: FakeGitLab) -> None:
    client = make_client(gitlab_fake, timeout_s=5.0, call_timeout_s=0.2)
    gitlab_fake.script("notes.list", Scripted(delay_s=0.5))
    with pytest.raises(ForgeConnectionError, match="timed out"):
        await client.list_notes(PROJECT, 3)
    client.close()


async def test_refused_connection_mapped() -> None:
    stopped = FakeGitLab()
    url = await stopped.start()
    await stopped.stop()
    client = GitLabClient(url, "t", timeout_s=2.0)
    with pytest.raises(ForgeConnectionError):
        await client.get_merge_request(PROJECT, 3)
    client.close()


async def test_reset_header_read_with_clock(gitlab_fake: FakeGitLab) -> None:
    client = GitLabClient(gitlab_fake.url, "glpat-test-token", clock=lambda: time.time() - 100)
    gitlab_fake.rate_limit("members.get")
    with pytest.raises(ForgeRateLimited) as caught:
        await client.get_access_level(PROJECT, 7)
    assert caught.value.retry_after_s >= 150
    client.close()


# Settings


def test_from_settings_without_token() -> None:
    with pytest.raises(ConfigError, match="KUBECI_GITLAB_TOKEN"):
        GitLabClient.from_settings(Settings())


def test_from_settings_with_token() -> None:
    settings = Settings(gitlab_token="t", gitlab_url="http://127.0.0.1:1", gitlab_timeout_s=3)
    client = GitLabClient.from_settings(settings)
    client.close()
