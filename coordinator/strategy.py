"""Algorithms as strategies of the pure controller: where models go, and what the coordinator does
with a model that reaches it. Snake Learning (P2P or client-server) and FedAvg share the agents, the
broker, the transfers and the accounting; only these decisions differ. Split learning
(:mod:`coordinator.split`) also answers per-batch activations (``on_activations``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.scheduler import Plan
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.transfer import Completed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSend:
    dst: str
    meta: dict[str, Any]  # "hop" names the receiver's task
    data: bytes
    purpose: str = "model"  # the transfer's purpose ("gradients" for split learning's per-batch answers)


@dataclass(frozen=True)
class Decision:
    sends: list[ModelSend] = field(default_factory=list)
    final: bytes | None = None  # the finished model, when the trial is over
    checkpoint: tuple[int, bytes] | None = None  # (round, model) when a round's model is complete


class Strategy(Protocol):
    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]: ...

    def on_model(self, plan: Plan, done: Completed) -> Decision: ...


class SnakeStrategy:
    """The model goes hop to hop. P2P: agents send to each other and the coordinator receives only
    the final model. Client-server: every hop's model comes back and is forwarded to the next hop."""

    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]:
        return [ModelSend(plan.hops[0].agent, {"hop": 0, "from_hop": -1, "round": 0}, initial)]

    def on_model(self, plan: Plan, done: Completed) -> Decision:
        hop = done.meta.get("hop")
        if not isinstance(hop, int) or not 0 < hop <= len(plan.hops):
            log.warning("model transfer %s from %s names hop %r; dropped", done.transfer_id, done.src, hop)
            return Decision()
        if hop == len(plan.hops):
            return Decision(final=done.data, checkpoint=(plan.hops[-1].round, done.data))
        ended = plan.hops[hop - 1].round if plan.hops[hop].round != plan.hops[hop - 1].round else None
        checkpoint = (ended, done.data) if ended is not None else None  # client-server: free per-round copies
        return Decision([ModelSend(plan.hops[hop].agent, dict(done.meta), done.data)], checkpoint=checkpoint)


class FedAvgStrategy:
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
        """Sample-weighted mean of every tensor (BatchNorm running statistics included)."""
        weights = {agent: float(max(self.samples.get(agent, 1), 1)) for agent in results}
        total = sum(weights.values())
        names = next(iter(results.values())).keys()
        return {
            name: sum(results[a][name].astype(np.float64) * (w / total) for a, w in weights.items()).astype(np.float32)
            for name in names
        }
