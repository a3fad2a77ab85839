"""Protocol errors: what a receiver reports, logs and drops."""

from __future__ import annotations

from edge_agent.errors import EdgeAgentError


class ProtocolError(EdgeAgentError):
    """A message that cannot be accepted; ``code`` goes into error replies."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
