"""The coordinator's exception root. Every error the coordinator raises on purpose derives from it."""

from __future__ import annotations

from typing import ClassVar

from edge_agent.exitcodes import ExitCode, ToolError


class CoordinatorError(ToolError):
    """Root of every error raised by coordinator (exit code 1 unless a subclass says otherwise)."""


class ConfigError(CoordinatorError):
    """A trial file or flag is wrong; the message says which key and why."""

    exit_code: ClassVar[ExitCode] = ExitCode.CONFIG


class TrialError(CoordinatorError):
    """A trial could not complete (agents missing, a peer dead, a timeout)."""
