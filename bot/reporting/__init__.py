"""Reporters: turn engine events into commit statuses, check runs and PR comments."""
