"""The comments of one pull request (GitHub) or merge request (GitLab), one interface."""

from __future__ import annotations

from typing import Protocol

from bot.forges.github import GitHubClient
from bot.forges.gitlab import GitLabClient
from bot.forges.models import Comment


class CommentThread(Protocol):
    async def find(self, marker: str, author: str | None, *, anywhere: bool = False) -> int | None:
        """Return the id of the oldest comment that starts with `marker`, or None.

        With `anywhere`, the marker may sit anywhere in the body. With `author`, only
        that user's comments count (logins compared case-insensitively). GitLab system
        notes never count.
        """
        ...

    async def own_login(self) -> str:
        """Return the login that comments posted through this thread appear under."""
        ...

    async def create(self, body: str) -> int:
        """Post a comment and return its id."""
        ...

    async def edit(self, comment_id: int, body: str) -> None: ...


def _first_marked(
    comments: list[Comment], marker: str, author: str | None, anywhere: bool
) -> int | None:
    for comment in comments:
        if author is not None and comment.author.lower() != author.lower():
            continue
        marked = marker in comment.body if anywhere else comment.body.startswith(marker)
        if marked:
            return comment.id
    return None


class GitHubThread:
    def __init__(self, client: GitHubClient, repository: str, number: int) -> None:
        self._client = client
        self._repository = repository
        self._number = number

    async def find(self, marker: str, author: str | None, *, anywhere: bool = False) -> int | None:
        comments = await self._client.list_comments(self._repository, self._number)
        return _first_marked(comments, marker, author, anywhere)

    async def own_login(self) -> str:
        return await self._client.authenticated_login()

    async def create(self, body: str) -> int:
        return (await self._client.create_comment(self._repository, self._number, body)).id

    async def edit(self, comment_id: int, body: str) -> None:
        await self._client.edit_comment(self._repository, comment_id, body)


class GitLabThread:
    def __init__(self, client: GitLabClient, project: str | int, iid: int) -> None:
        self._client = client
        self._project = project
        self._iid = iid

    async def find(self, marker: str, author: str | None, *, anywhere: bool = False) -> int | None:
        notes = await self._client.list_notes(self._project, self._iid)
        user_notes = [note for note in notes if not note.author_is_bot]
        return _first_marked(user_notes, marker, author, anywhere)

    async def own_login(self) -> str:
        return await self._client.authenticated_username()

    async def create(self, body: str) -> int:
        return (await self._client.create_note(self._project, self._iid, body)).id

    async def edit(self, comment_id: int, body: str) -> None:
        await self._client.edit_note(self._project, self._iid, comment_id, body)


def thread_for(
    client: GitHubClient | GitLabClient, project: str | int, number: int
) -> CommentThread:
    """Return the comment thread of pull request `number` in `project`."""
    if isinstance(client, GitHubClient):
        return GitHubThread(client, str(project), number)
    return GitLabThread(client, project, number)
