"""One GitHub client and one GitLab client per process, built on first use."""

from __future__ import annotations

import logging

import aiohttp

from bot.config import ConfigError, Settings
from bot.forges.github import GitHubClient
from bot.forges.gitlab import GitLabClient

log = logging.getLogger(__name__)


class ForgeClients:
    """Builds the forge clients from the settings when first asked, and closes them.

    A forge without credentials raises ConfigError naming the variables to set, at the
    first call that needs it, so a service that only talks to GitLab needs no GitHub
    settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._github: GitHubClient | None = None
        self._gitlab: GitLabClient | None = None

    def github(self) -> GitHubClient:
        if self._github is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._github = GitHubClient.from_settings(self.settings, self._session)
        return self._github

    def gitlab(self) -> GitLabClient:
        if self._gitlab is None:
            self._gitlab = GitLabClient.from_settings(self.settings)
        return self._gitlab

    def for_forge(self, forge: str) -> GitHubClient | GitLabClient:
        if forge == "github":
            return self.github()
        if forge == "gitlab":
            return self.gitlab()
        raise ConfigError(f"unknown forge {forge!r}; expected github or gitlab")

    async def close(self) -> None:
        if self._gitlab is not None:
            self._gitlab.close()
            self._gitlab = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._github = None
