"""Forge API clients: `bot.forges.github.GitHubClient` and `bot.forges.gitlab.GitLabClient`.

Both return the forge-neutral shapes of `bot.forges.models` and raise the exceptions
of `bot.forges.errors`.
"""
