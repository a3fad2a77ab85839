"""The edge agent's exception root. Every error the agent raises on purpose derives from it."""

from __future__ import annotations

from typing import ClassVar

from edge_agent.exitcodes import ExitCode, ToolError


class EdgeAgentError(ToolError):
    """Root of all edge_agent errors (exit code 1 unless a subclass says otherwise)."""


class LinkError(EdgeAgentError):
    """The link to the broker could not be set up (bad URL, broker unreachable or refusing)."""

    exit_code: ClassVar[ExitCode] = ExitCode.BROKER
