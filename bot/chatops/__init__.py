"""Chat-ops: commands in pull request comments, and the trust policy for untrusted PRs.

`ChatOps` is the webhook intake's comment handler and `ForkTrustPolicy` its trust
policy. `chatops_sinks` returns the outbox sink for the labels chat-ops adds.
"""

from bot.chatops.commands import ChatOps
from bot.chatops.outbox import chatops_sinks
from bot.chatops.trust import ForkTrustPolicy

__all__ = ["ChatOps", "ForkTrustPolicy", "chatops_sinks"]
