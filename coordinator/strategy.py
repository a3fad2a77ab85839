"""Algorithms as strategies of the pure controller: where models go, and what the coordinator does
with a model that reaches it. Snake Learning (P2P or client-server) and FedAvg share the agents, the
broker, the transfers and the accounting; only these decisions differ. Split learning
(:mod:`coordinator.split`) also answers per-batch activations (``on_activations``): it asks for a
back step (a job the shell runs) and answers with its gradient once the step is done (``on_stepped``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.events import BackStep, Job, Stepped
from coordinator.plan import Plan
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.delta import Base, BaseMismatch, assemble, decode_model, digests_of, encode_model, newer
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import Purpose
from edge_agent.protocol.transfer import Completed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSend:
    dst: str
    meta: dict[str, Any]  # "hop" names the receiver's task
    data: bytes
    purpose: Purpose = Purpose.MODEL  # GRADIENTS for split learning's per-batch answers


@dataclass(frozen=True)
class Decision:
    sends: list[ModelSend] = field(default_factory=list)
    final: bytes | None = None  # the finished model, when the trial is over
    checkpoint: tuple[int, bytes] | None = None  # (round, model) when a round's model is complete
    request: tuple[str, int, str] | None = None  # (agent, hop, reason): ask the agent for its whole model
    jobs: list[Job] = field(default_factory=list)  # slow work for the shell (a split-learning back step)


class Strategy(Protocol):
    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]:
        """The first model(s) to send once every hop is assigned."""

    def on_model(self, plan: Plan, done: Completed) -> Decision:
        """A model reached the coordinator."""

    def on_request(self, plan: Plan, agent: str, hop: int) -> list[ModelSend]:
        """An agent asks for the whole model of ``hop`` (its cached copy could not complete a delta)."""

    def on_activations(self, plan: Plan, done: Completed) -> Decision:
        """Split learning: one batch of activations arrived."""

    def on_stepped(self, plan: Plan, job: BackStep, result: Stepped) -> Decision:
        """Split learning: the back step asked for by ``on_activations`` is done."""


class WholeModels:
    """For strategies whose agents train whole segments: activations are not expected."""

    def on_activations(self, plan: Plan, done: Completed) -> Decision:
        log.warning("activations transfer %s from %s: this algorithm trains no split; dropped",
                    done.transfer_id, done.src)  # fmt: skip
        return Decision()

    def on_stepped(self, plan: Plan, job: BackStep, result: Stepped) -> Decision:
        return Decision()


class SnakeStrategy(WholeModels):
    """The model goes hop to hop. P2P: agents send to each other and the coordinator receives only
    the final model. Client-server: every hop's model comes back and is forwarded to the next hop.

    Only what changed travels: the coordinator keeps the latest whole model it knows and its group
    versions, completes deltas it receives from it, and sends each agent only the groups newer than
    the copy the plan says it holds (``Plan.held_by``)."""

    def __init__(self, compression: str = "none") -> None:
        self.compression = compression
        self.model: dict[str, np.ndarray] = {}
        self.versions: dict[str, int] = {}
        self.digests: dict[str, str] = {}
        self.hop = 0  # the hop the kept model is for

    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]:
        layout = plan.groups()
        self.model = decode_tensors(initial)
        self.versions, self.digests = plan.versions_after(-1), digests_of(self.model, layout)
        data = encode_model(self.model, layout, self.versions, self.digests, list(layout))  # fp32, as exported
        return [ModelSend(plan.hops[0].agent, {"hop": 0, "from_hop": -1, "round": 0}, data)]

    def snapshot(self, plan: Plan) -> tuple[int, bytes]:
        """The model the coordinator holds (the input of hop ``self.hop``), for a resumed coordinator."""
        return self.hop, self._encode(plan, list(plan.groups()), "none")

    def resume(self, plan: Plan, initial: bytes, held: tuple[int, bytes] | None) -> None:
        """A resumed coordinator: the initial model, or the model it held when it stopped (client-server)."""
        self.start(plan, initial, {})
        if held is not None:
            self.hop = held[0]
            self._merge(plan, held[1])

    def on_model(self, plan: Plan, done: Completed) -> Decision:
        hop = done.meta.get("hop")
        if not isinstance(hop, int) or not 0 < hop <= len(plan.hops):
            log.warning("model transfer %s from %s names hop %r; dropped", done.transfer_id, done.src, hop)
            return Decision()
        try:
            self._merge(plan, done.data)
        except BaseMismatch as exc:
            log.warning("model for hop %d from %s: %s; asking for the whole model", hop, done.src, exc.message)
            return Decision(request=(done.src, hop, exc.message))
        self.hop = hop
        whole = self._encode(plan, list(plan.groups()), "none")
        if hop == len(plan.hops):
            return Decision(final=whole, checkpoint=(plan.hops[-1].round, whole))
        ended = plan.hops[hop - 1].round if plan.hops[hop].round != plan.hops[hop - 1].round else None
        checkpoint = (ended, whole) if ended is not None else None  # client-server: free per-round copies
        send = newer(self.versions, plan.held_by(hop)) if plan.layout else []
        data = self._encode(plan, send, self.compression)
        return Decision([ModelSend(plan.hops[hop].agent, dict(done.meta), data)], checkpoint=checkpoint)

    def on_request(self, plan: Plan, agent: str, hop: int) -> list[ModelSend]:
        """An agent's cached copy could not complete what we sent it: send it the whole model again."""
        if hop != self.hop or not 0 <= hop < len(plan.hops) or plan.hops[hop].agent != agent:
            raise ProtocolError("unknown_hop", f"the coordinator did not send {agent} the model for hop {hop}")
        meta = {"hop": hop, "from_hop": hop - 1, "round": plan.hops[hop].round}
        return [ModelSend(agent, meta, self._encode(plan, list(plan.groups()), self.compression))]

    def _merge(self, plan: Plan, data: bytes) -> None:
        payload, header = decode_model(data)
        layout = plan.groups()
        if header is None or not layout:
            self.model = {n: np.array(t, np.float32) for n, t in payload.items()}
            self.versions, self.digests = {}, digests_of(self.model, layout)
            return
        merged = assemble(payload, header, layout, Base(self.versions, self.model))
        self.model = {n: np.array(t, np.float32) for n, t in merged.items()}  # own copies, not views of ``data``
        self.versions, self.digests = dict(header.versions), dict(header.digests)

    def _encode(self, plan: Plan, send: list[str], compression: str) -> bytes:
        return encode_model(self.model, plan.groups(), self.versions, self.digests, send, compression)


class FedAvgStrategy(WholeModels):
    """Every agent trains the whole model each round from the same global model; the coordinator
    averages the results weighted by each agent's training samples (McMahan et al. 2017)."""

    def __init__(self, compression: str = "none") -> None:
        self.compression = compression
        self.samples: dict[str, int] = {}
        self.results: dict[int, dict[str, dict[str, np.ndarray]]] = {}  # round -> agent -> tensors

    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]:
        self.samples = dict(samples)
        return self._broadcast(plan, 0, initial)

    def _broadcast(self, plan: Plan, round_: int, data: bytes) -> list[ModelSend]:
        return [
            ModelSend(h.agent, {"hop": h.hop, "from_hop": -1, "round": round_}, data)
            for h in plan.hops
            if h.round == round_
        ]

    def on_request(self, plan: Plan, agent: str, hop: int) -> list[ModelSend]:
        raise ProtocolError("unknown_hop", "FedAvg sends whole models; there is nothing to complete")

    def on_model(self, plan: Plan, done: Completed) -> Decision:
        src_hop = done.meta.get("from_hop")
        if not isinstance(src_hop, int) or not 0 <= src_hop < len(plan.hops) or plan.hops[src_hop].agent != done.src:
            log.warning("model transfer %s from %s names hop %r; dropped", done.transfer_id, done.src, src_hop)
            return Decision()
        hop = plan.hops[src_hop]
        results = self.results.setdefault(hop.round, {})
        results[hop.agent] = decode_tensors(done.data)
        expected = {h.agent for h in plan.hops if h.round == hop.round}
        if set(results) != expected:
            return Decision()
        merged = encode_tensors(self.average(results), self.compression)
        del self.results[hop.round]
        log.info("round %d: averaged %d models", hop.round, len(results))
        if hop.round + 1 == plan.rounds:
            return Decision(final=merged, checkpoint=(hop.round, merged))
        return Decision(self._broadcast(plan, hop.round + 1, merged), checkpoint=(hop.round, merged))

    def average(self, results: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Sample-weighted mean of every tensor (BatchNorm running statistics included). Summed in the order
        of the agents' names, not the order their models arrived in: a float sum depends on its order, and
        the same seed must give the same model however the agents' timing falls."""
        weights = {agent: float(max(self.samples.get(agent, 1), 1)) for agent in sorted(results)}
        total = sum(weights.values())
        names = next(iter(results.values())).keys()
        return {
            name: sum(results[a][name].astype(np.float64) * (w / total) for a, w in weights.items()).astype(np.float32)
            for name in names
        }
