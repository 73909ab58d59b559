"""Postgres access: the connection pool, migrations and the embedded server.

The store is the bottom layer: it imports nothing else from `bot`.
"""
