"""Where a report goes: the forge, the repository or project, and the outbox keys.

Writes to one GitHub App installation (or, without one, one repository) and to one
GitLab project share an ordering key, so the outbox sender makes them one at a time,
oldest first. That keeps a job's final status after its pending one, and follows
GitHub's advice to make requests serially to avoid secondary rate limits
(https://docs.github.com/rest/guides/best-practices-for-using-the-rest-api).

NOTE: the same page also advises a one-second pause between mutating requests.
KubeCI does not pause; it waits and retries when GitHub reports a secondary limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

Forge = Literal["github", "gitlab"]
FORGES: tuple[Forge, ...] = ("github", "gitlab")

GITHUB_STATUS = "github.status"
GITHUB_CHECK_RUN = "github.check_run"
GITHUB_COMMENT = "github.comment"
GITHUB_REPLY = "github.reply"
GITHUB_REACTION = "github.reaction"
GITLAB_STATUS = "gitlab.status"
GITLAB_COMMENT = "gitlab.comment"
GITLAB_REPLY = "gitlab.reply"
GITLAB_REACTION = "gitlab.reaction"


class TargetFields(TypedDict):
    forge: str
    repository: str
    project: str | int
    installation_id: NotRequired[int]


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return None


def check_forge(forge: str) -> Forge:
    """Return `forge` if KubeCI reports to it; raise ValueError otherwise."""
    if forge == "github":
        return "github"
    if forge == "gitlab":
        return "gitlab"
    raise ValueError(f"cannot report to forge {forge!r}; expected 'github' or 'gitlab'")


@dataclass(frozen=True)
class Target:
    """A repository on a forge, as reports address it.

    `repository` is the name runs are stored under (GitHub `owner/name`, GitLab
    `group/project`). `project` is what the API is called with: the same name on
    GitHub, the numeric project id on GitLab when the webhook gave one.
    """

    forge: Forge
    repository: str
    project: str | int
    installation_id: int | None = None

    @classmethod
    def of(cls, forge: str, repository: str, source: Mapping[str, Any]) -> Target:
        """Build the target of a run or trigger from its forge, repository and `source`."""
        checked = check_forge(forge)
        if not repository:
            raise ValueError(f"cannot report to {forge}: the repository name is empty")
        if checked == "github":
            installation_id = _positive_int(source.get("installation_id"))
            return cls(checked, repository, repository, installation_id)
        project_id = _positive_int(source.get("project_id"))
        return cls(checked, repository, project_id or repository)

    @property
    def ordering_key(self) -> str:
        if self.forge == "github":
            if self.installation_id is not None:
                return f"github:inst:{self.installation_id}"
            return f"github:repo:{self.repository}"
        return f"gitlab:project:{self.project}"

    def kind(self, report: str) -> str:
        """Return the outbox kind of a `report` (status, comment, ...) on this forge."""
        return f"{self.forge}.{report}"

    def status_key(self, sha: str, context: str) -> str:
        return f"{self.forge}:status:{self.project}:{sha}:{context}"

    def check_key(self, sha: str, name: str) -> str:
        return f"github:check:{self.project}:{sha}:{name}"

    def comment_key(self, pr_number: int) -> str:
        separator = "#" if self.forge == "github" else "!"
        return f"{self.forge}:comment:{self.project}{separator}{pr_number}"

    def payload(self) -> TargetFields:
        """Return the fields every payload for this target carries."""
        fields: TargetFields = {
            "forge": self.forge,
            "repository": self.repository,
            "project": self.project,
        }
        if self.installation_id is not None:
            fields["installation_id"] = self.installation_id
        return fields

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Target:
        """Read the target back from a payload written by `payload()`.

        Raises ValueError naming the field when the payload lacks one.
        """
        forge = check_forge(str(payload.get("forge")))
        repository = payload.get("repository")
        project = payload.get("project")
        if not isinstance(repository, str) or not repository:
            raise ValueError("the outbox payload has no repository")
        if not isinstance(project, str | int) or isinstance(project, bool) or project == "":
            raise ValueError("the outbox payload has no project")
        return cls(forge, repository, project, _positive_int(payload.get("installation_id")))
