"""Pull requests for chat-ops: read from the forge and turned into run triggers."""

from __future__ import annotations

from typing import Any

from bot.forges.clients import ForgeClients
from bot.forges.models import PullRequest
from bot.intake.events import NewComment, Trigger


async def fetch_pull_request(forges: ForgeClients, comment: NewComment) -> PullRequest:
    """Read the pull request (GitHub) or merge request (GitLab) a comment belongs to.

    Raises `bot.forges.errors.ForgeError` when the forge fails, and ConfigError when
    the forge has no credentials configured.
    """
    if comment.forge == "github":
        client = forges.github()
        if comment.installation_id is not None:
            client.remember_installation(comment.repository, comment.installation_id)
        return await client.get_pull_request(comment.repository, comment.pr_number)
    project = comment.project_id if comment.project_id is not None else comment.repository
    return await forges.gitlab().get_merge_request(project, comment.pr_number)


def pull_request_trigger(comment: NewComment, pr: PullRequest) -> Trigger:
    """Build the trigger of a run that a comment starts on the pull request's head commit.

    Its labels are those of a webhook run of the same pull request (see
    `comment_labels` for what a comment adds).
    """
    github = comment.forge == "github"
    head_project_id = None
    if not github and pr.head_repository is not None and pr.head_repository.isdigit():
        head_project_id = int(pr.head_repository)
    return Trigger(
        forge=comment.forge,
        event="pull_request",
        repository=comment.repository,
        sha=pr.head_sha,
        ref=(f"refs/pull/{pr.number}/head" if github else f"refs/merge-requests/{pr.number}/head"),
        pr_number=pr.number,
        source_branch=pr.head_ref,
        target_branch=pr.base_ref,
        pr_labels=pr.labels,
        author=pr.author,
        author_id=pr.author_id,
        fork=pr.fork,
        # GitLab reports the source project by id only.
        head_repository=pr.head_repository if github else None,
        head_project_id=head_project_id,
        draft=pr.draft,
        installation_id=comment.installation_id,
        project_id=comment.project_id,
    )


def comment_labels(trigger: Trigger, comment: NewComment) -> dict[str, Any]:
    """Return the run labels of a comment-started run: the pull request's, plus the comment's."""
    labels: dict[str, Any] = dict(trigger.labels())
    labels["trigger"] = "comment"
    labels["comment.author"] = comment.author
    return labels
