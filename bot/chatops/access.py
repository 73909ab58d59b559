"""Write-access lookups on GitHub and GitLab, remembered for the lifetime of one checker.

Write access means the GitHub repository role admin, maintain or write (custom roles
count by their base role), or the GitLab access level Developer (30) or higher,
inherited membership included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bot.forges.clients import ForgeClients
from bot.forges.models import WRITE_PERMISSIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgeUser:
    """A user on a forge, in a repository, as a webhook names them."""

    forge: str
    repository: str
    login: str
    # Needed on GitLab, where membership is looked up by user id.
    user_id: int | None = None
    # GitLab project id; without it the GitLab API is called with `repository`.
    project_id: int | None = None
    # GitHub App installation of `repository`, which spares the client a lookup.
    installation_id: int | None = None


class AccessChecker:
    """Write-access checks that ask the forge once per user.

    Build one per comment or per delivery, so that a changed role counts from the
    next event on. Forge failures raise `bot.forges.errors.ForgeError`.
    """

    def __init__(self, forges: ForgeClients) -> None:
        self._forges = forges
        self._known: dict[tuple[str, str, str], bool] = {}
        self.lookups = 0

    async def may_write(self, user: ForgeUser) -> bool:
        key = (user.forge, user.repository.lower(), user.login.lower())
        if key not in self._known:
            self.lookups += 1
            self._known[key] = await self._look_up(user)
            log.info(
                "%s %s write access",
                user.login,
                "has" if self._known[key] else "lacks",
                extra={"forge": user.forge, "repository": user.repository},
            )
        return self._known[key]

    async def _look_up(self, user: ForgeUser) -> bool:
        if user.forge == "github":
            client = self._forges.github()
            if user.installation_id is not None:
                client.remember_installation(user.repository, user.installation_id)
            permission = await client.get_collaborator_permission(user.repository, user.login)
            return permission in WRITE_PERMISSIONS
        if user.user_id is None:
            # GitLab looks members up by id; a webhook without one leaves no way to check.
            log.warning(
                "no GitLab user id for %s; treating the user as lacking write access",
                user.login,
                extra={"forge": user.forge, "repository": user.repository},
            )
            return False
        project = user.project_id if user.project_id is not None else user.repository
        return await self._forges.gitlab().has_write_access(project, user.user_id)
