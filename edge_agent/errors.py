"""The edge agent's exception root. Every error the agent raises on purpose derives from it."""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Root of all edge_agent errors."""
