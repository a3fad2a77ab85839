"""Split learning (Gupta & Raskar 2018, vanilla sequential SL) as a strategy of the pure controller.

The model is cut after a layer group: agents train the **front**, the coordinator the **back**.
Each round the agents take turns in route order. The agent holding the front sends, per batch,
its activations and labels; :meth:`SplitStrategy.on_activations` asks the shell for a back step (a
``BackStep`` job: the back's forward, loss, backward and optimizer step, run by a :class:`Back`; torch
in :mod:`coordinator.split_back`) and :meth:`SplitStrategy.on_stepped` answers with dL/dA. After its epoch the agent returns the front, which goes to the next agent. At the end
of every round the coordinator assembles front + back for the usual evaluation and results.

Idempotent by batch: a batch (hop, seq) is trained once; a repeat of the batch last answered gets
the same answer again; anything older, or for a hop not running, is logged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from coordinator.events import BackStep, Stepped
from coordinator.plan import Plan
from coordinator.strategy import Decision, ModelSend
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import Purpose
from edge_agent.protocol.split import batch_meta, decode_activations, encode_gradient, parse_batch
from edge_agent.protocol.transfer import Completed

log = logging.getLogger(__name__)


class Back(Protocol):
    """The part of the model the coordinator trains."""

    def step(self, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """Forward, loss, backward and optimizer step on one batch; returns (dL/d activations, loss)."""

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the back (parameters and buffers) by wire name."""


class SplitStrategy:
    """Reads the back's tensors at the end of a round; never steps it (the shell does, as a job)."""

    def __init__(self, back: Back, compression: str = "none") -> None:
        self.back = back
        self.compression = compression
        self.front: dict[str, np.ndarray] = {}
        self.current = 0  # the hop training the front now
        self.answered: dict[int, tuple[int, ModelSend]] = {}  # hop -> (last seq answered, its answer)
        self.stepping: dict[int, int] = {}  # hop -> the latest seq sent to a back step
        self.batches = 0

    def start(self, plan: Plan, initial: bytes, samples: Mapping[str, int]) -> list[ModelSend]:
        model = decode_tensors(initial)
        self.front = {name: model[name] for name in plan.segments[0].tensors}
        data = encode_tensors(self.front, self.compression)
        return [ModelSend(plan.hops[0].agent, {"hop": 0, "from_hop": -1, "round": 0}, data)]

    def on_model(self, plan: Plan, done: Completed) -> Decision:
        """A trained front came back: pass it on; assemble the model at the end of a round."""
        hop = done.meta.get("hop")
        if not isinstance(hop, int) or not 0 < hop <= len(plan.hops) or plan.hops[hop - 1].agent != done.src:
            log.warning("front transfer %s from %s names hop %r; dropped", done.transfer_id, done.src, hop)
            return Decision()
        front = decode_tensors(done.data)
        missing = set(plan.segments[0].tensors) - set(front)
        if missing:
            raise ProtocolError("malformed", f"front from {done.src} lacks {len(missing)} tensor(s)")
        self.front, self.current = {n: front[n] for n in plan.segments[0].tensors}, hop
        round_ = plan.hops[hop - 1].round
        ends_round = hop == len(plan.hops) or plan.hops[hop].round != round_
        model = encode_tensors(self.front | self.back.tensors(), self.compression) if ends_round else None
        checkpoint = (round_, model) if model is not None else None
        if hop == len(plan.hops):
            return Decision(final=model, checkpoint=checkpoint)
        return Decision([ModelSend(plan.hops[hop].agent, dict(done.meta), done.data)], checkpoint=checkpoint)

    def on_request(self, plan: Plan, agent: str, hop: int) -> list[ModelSend]:
        raise ProtocolError("unknown_hop", "split learning sends whole fronts; there is nothing to complete")

    def on_activations(self, plan: Plan, done: Completed) -> Decision:
        """One batch of the hop in progress: ask for a back step on it (its gradient is the answer)."""
        hop, seq = parse_batch(done.meta)
        if hop != self.current or hop >= len(plan.hops) or plan.hops[hop].agent != done.src:
            log.warning("activations for hop %d batch %d from %s: hop %d is training; dropped",
                        hop, seq, done.src, self.current)  # fmt: skip
            return Decision()
        last = self.answered.get(hop)
        if last is not None and seq <= last[0]:
            if seq == last[0]:  # the agent asked again (e.g. our answer was lost): same answer, no second step
                log.info("batch %d of hop %d again from %s; answering it again", seq, hop, done.src)
                return Decision([last[1]])
            log.warning("batch %d of hop %d from %s is older than batch %d; dropped", seq, hop, done.src, last[0])
            return Decision()
        if self.stepping.get(hop, -1) >= seq:  # a duplicate while its step runs: the step's answer will do
            return Decision()
        activations, labels = decode_activations(done.data)
        self.stepping[hop] = seq
        return Decision(jobs=[BackStep(hop, seq, done.src, activations, labels)])

    def on_stepped(self, plan: Plan, job: BackStep, result: Stepped) -> Decision:
        """The back trained on batch ``job.seq``: answer with dL/dA."""
        meta = batch_meta(job.hop, job.seq, loss=result.loss)
        send = ModelSend(job.src, meta, encode_gradient(result.gradient, self.compression), purpose=Purpose.GRADIENTS)
        self.answered[job.hop] = (job.seq, send)
        self.batches += 1
        return Decision([send])
