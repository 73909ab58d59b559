"""Forge webhook intake: authenticate, decode and classify GitHub and GitLab deliveries.

`bot.intake.github` and `bot.intake.gitlab` turn a request's body and headers into a
`Delivery` and an `Intent` (see `bot.intake.events`) without any I/O.
"""
