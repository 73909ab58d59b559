"""HTTP handlers: callbacks, health checks, run pages."""
