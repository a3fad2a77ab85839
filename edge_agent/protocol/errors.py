"""Protocol errors: what a receiver reports, logs and drops."""

from __future__ import annotations

from collections import Counter

from edge_agent.errors import EdgeAgentError


class ProtocolError(EdgeAgentError):
    """A message that cannot be accepted; ``code`` goes into error replies."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Rejections:
    """Refused inbound messages, counted by reason code (``malformed``, ``wrong_trial``, ``internal``...)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, code: str) -> None:
        self.counts[code] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
