"""The coordinator's exception root. Every error the coordinator raises on purpose derives from it."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of every error raised by coordinator."""


class ConfigError(CoordinatorError):
    """A trial file or flag is wrong; the message says which key and why."""


class TrialError(CoordinatorError):
    """A trial could not complete (agents missing, a peer dead, a timeout)."""
