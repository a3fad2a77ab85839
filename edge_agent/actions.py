"""What the pure ``Agent`` asks its service to do (actions) and what the service hands back.

The agent decides; the service (``edge_agent.service``) performs: train a hop, store an artifact
bundle, resend a whole model from the cache, pass a split-learning gradient to the training worker,
say goodbye. Plain dataclasses, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.messages import HopTask
from edge_agent.protocol.transfer import Outgoing
from edge_agent.trainer import EvalStats, TrainStats


@dataclass
class Received:
    """A model transfer waiting for its hop. ``take`` hands the bytes over once, so they can be freed."""

    src: str
    hop: int
    size: int
    data: bytes | None
    trial_id: str | None = None  # the trial the sender named (a model may arrive before its assignment)

    def take(self) -> bytes:
        data, self.data = self.data, None
        if data is None:
            raise ProtocolError("internal", f"model for hop {self.hop} was already loaded")
        return data


@dataclass(frozen=True)
class Train:
    """Action: complete ``received`` into the whole model, train ``task``'s segment, encode the result."""

    task: HopTask
    received: Received
    trial_id: str
    layout: dict[str, list[str]]  # layer group -> parameter names (empty: no deltas)
    compression: str


@dataclass(frozen=True)
class ResendFull:
    """Action: send ``dst`` the whole model this agent handed on after ``hop`` (from its cache)."""

    dst: str
    hop: int
    trial_id: str
    layout: dict[str, list[str]]
    compression: str


@dataclass(frozen=True)
class StoreArtifact:
    """Action: verify and unpack an artifact bundle into the on-disk store."""

    sha256: str
    blob: bytes


@dataclass(frozen=True)
class SayBye:
    """Action: send final figures to the coordinator (``Agent.bye``), then exit if asked."""

    reason: str
    exit: bool


@dataclass(frozen=True)
class Gradient:
    """Action: hand the training worker dL/dA of the batch it waits for (split learning)."""

    hop: int
    seq: int
    gradient: np.ndarray
    loss: float  # the coordinator's loss on that batch


Action = Train | StoreArtifact | SayBye | ResendFull | Gradient


@dataclass
class Effects:
    out: list[Outgoing] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    def extend(self, other: Effects) -> Effects:
        self.out.extend(other.out)
        self.actions.extend(other.actions)
        return self


@dataclass(frozen=True)
class HopResult:
    """What the service reports back after running a Train action."""

    task: HopTask
    data: bytes  # the encoded model (the groups ``task.next`` lacks) to hand on
    checkpoint: bytes | None  # the whole model for the coordinator, when the task asks for a copy
    train: TrainStats
    val: EvalStats
    trainable_params: int


@dataclass(frozen=True)
class Counters:
    """Process-level figures the service supplies with each report."""

    bytes_sent: int
    bytes_received: int
    peak_rss_mb: float
