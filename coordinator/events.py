"""What the pure ``Controller`` tells its shell: events (facts for display and records) and jobs
(slow work the shell runs off the message loop and reports back with ``Controller.job_done``).

Jobs exist because the controller must never block: building a plan's artifacts (torch export,
artifact generation, lowering) takes minutes, a split-learning back step runs torch, and evaluating a
round's model exports and runs it. While a job runs, the loop keeps acknowledging transfers and
running timers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.plan import Plan
from edge_agent.protocol.messages import Bye, Hello, HopDone, HopProgress, HopStarted

# -- events ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joined:
    agent: str
    hello: Hello


@dataclass(frozen=True)
class Planned:
    plan: Plan


@dataclass(frozen=True)
class Excluded:
    agent: str
    reason: str


@dataclass(frozen=True)
class HopBegan:
    agent: str
    report: HopStarted


@dataclass(frozen=True)
class HopMoved:
    agent: str
    report: HopProgress


@dataclass(frozen=True)
class HopFinished:
    agent: str
    report: HopDone
    hop_s: float  # from the agent's hop_started to its hop_done, as the coordinator saw them


@dataclass(frozen=True)
class Warned:
    agent: str  # "" for the trial as a whole
    text: str


@dataclass(frozen=True)
class Fault:
    """Something went wrong in the field and how the trial recovered (or not)."""

    at_s: float  # seconds since the trial started
    kind: str  # "agent_lost" | "agent_restarted" | "agent_returned" | "hand_off_failed"
    agent: str
    hop: int | None  # the hop it hit, if any
    detail: str  # what was seen
    recovery: str  # what the coordinator did


@dataclass(frozen=True)
class Relayed:
    """Client-server: the coordinator now holds the model hop ``hop`` starts from (a journal keeps it)."""

    hop: int


@dataclass(frozen=True)
class Replanned:
    """The rest of the trial runs on a new route (from hop ``start`` on)."""

    plan: Plan
    start: int


@dataclass(frozen=True)
class SaidBye:
    agent: str
    bye: Bye


@dataclass(frozen=True)
class RoundModel:
    """A round's whole model is known (evaluation follows as an ``EvaluateRound`` job)."""

    round: int
    model: bytes


@dataclass(frozen=True)
class RoundEvaluated:
    round: int
    accuracy: float
    loss: float
    bytes_so_far: int  # what the algorithm moved up to the end of this round


@dataclass(frozen=True)
class Finished:
    agent: str  # who delivered the final model
    model: bytes


@dataclass(frozen=True)
class Failed:
    reason: str


Event = (
    Joined | Planned | Excluded | HopBegan | HopMoved | HopFinished | Warned | SaidBye | RoundModel | RoundEvaluated
    | Finished | Failed | Fault | Replanned | Relayed
)  # fmt: skip

# -- jobs and their results -------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildArtifacts:
    """Build the plan's segment bundles. Result: ``Built``."""

    plan: Plan


@dataclass(frozen=True)
class Built:
    artifacts: dict[tuple[int, str], tuple[str, int]]  # (segment, kind) -> (sha256, size)
    blobs: dict[str, bytes]  # sha256 -> bundle


@dataclass(frozen=True)
class BackStep:
    """Split learning: forward, loss, backward and step of the back on one batch. Result: ``Stepped``."""

    hop: int
    seq: int
    src: str
    activations: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Stepped:
    gradient: np.ndarray  # dL/d activations
    loss: float


@dataclass(frozen=True)
class EvaluateRound:
    """Evaluate a round's model on the test set. Result: ``Evaluation``."""

    round: int
    model: bytes
    bytes_so_far: int


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


Job = BuildArtifacts | BackStep | EvaluateRound
