"""Everything KubeCI sends over HTTP that is not a forge API call builds on this package:
the outbound address guard, client sessions, retry timing, secrets and the outbox
sink contract. It imports nothing from the layers above it.
"""
