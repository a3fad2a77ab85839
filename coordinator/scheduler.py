"""Trial plans: which agent trains which segment, in which order. Pure functions.

A **segment** is a contiguous run of layer groups. The default Snake Learning
plan splits the groups into ``S = min(agents, groups)`` segments balanced by
parameter count, visits every agent once per round in a fixed route, and rotates
the segments over rounds (agent ``i`` trains segment ``(i + r + phase) mod S`` in
round ``r``), so after ``S`` rounds every layer group has trained on every agent's
data. The phase is chosen so that the trial's last hop trains the output-side
segment: a trial that ends on a middle segment ends with the classifier matched to
features that just moved (measured on Fashion-MNIST/cnn: finishing on the large
``fc`` segment cost about 0.015-0.02 test accuracy against finishing on ``head``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edge_agent.protocol.delta import INITIAL
from edge_agent.protocol.messages import HopTask
from edge_agent.protocol.topics import COORDINATOR


@dataclass(frozen=True)
class GroupInfo:
    name: str
    params: tuple[str, ...]  # trainable parameter names
    buffers: tuple[str, ...]  # other float tensors (BN running stats)
    num_params: int  # scalar parameter count


@dataclass(frozen=True)
class Segment:
    index: int
    groups: tuple[str, ...]
    params: tuple[str, ...]  # trainable in this segment's artifacts
    tensors: tuple[str, ...]  # every tensor the segment owns (params + buffers)
    num_params: int


@dataclass(frozen=True)
class PlannedHop:
    round: int
    hop: int  # global index
    agent: str
    segment: int


@dataclass(frozen=True)
class Plan:
    mode: str  # "p2p" | "cs"
    segments: tuple[Segment, ...]
    hops: tuple[PlannedHop, ...]
    algorithm: str = "snake"  # "snake" | "fedavg"
    layout: tuple[tuple[str, tuple[str, ...]], ...] = ()  # versioned layer groups and their parameters (snake)

    def groups(self) -> dict[str, list[str]]:
        """Layer group -> parameter names: what a model transfer versions (empty: whole models travel)."""
        return {g: list(params) for g, params in self.layout}

    def versions_after(self, hop: int) -> dict[str, int]:
        """Each group's version (the last hop that trained it) once ``hop`` is done; -1: the initial model."""
        versions = {g: INITIAL for g, _ in self.layout}
        for h in self.hops[: hop + 1]:
            versions.update({g: h.hop for g in self.segments[h.segment].groups if g in versions})
        return versions

    def held_by(self, hop: int) -> dict[str, int]:
        """The versions the agent of ``hop`` holds on disk when its model arrives: its previous hop's output
        (empty on its first hop: it holds nothing)."""
        agent = self.hops[hop].agent
        before = [h.hop for h in self.hops[:hop] if h.agent == agent]
        return self.versions_after(before[-1]) if before else {}

    @property
    def rounds(self) -> int:
        return 1 + max(h.round for h in self.hops) if self.hops else 0

    def describe(self) -> list[str]:
        """Human-readable lines: the segments, then the route per round."""
        lines = [f"segment {s.index}: {', '.join(s.groups)} ({s.num_params:,} params)" for s in self.segments]
        joiner = " | " if self.algorithm == "fedavg" else " -> "  # fedavg: agents train in parallel
        for r in range(self.rounds):
            route = [f"{h.agent}[s{h.segment}]" for h in self.hops if h.round == r]
            lines.append(f"round {r}: " + joiner.join(route))
        return lines


def split_segments(groups: Sequence[GroupInfo], parts: int) -> list[Segment]:
    """Contiguous partition of ``groups`` into ``parts`` runs minimising the largest parameter count."""
    if not 1 <= parts <= len(groups):
        raise ValueError(f"cannot split {len(groups)} layer groups into {parts} segments")
    sizes = [g.num_params for g in groups]
    cuts = _min_max_cuts(sizes, parts)
    segments = []
    for index, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(groups)], strict=True)):
        run = groups[lo:hi]
        params = tuple(p for g in run for p in g.params)
        tensors = tuple(t for g in run for t in (*g.params, *g.buffers))
        segments.append(Segment(index, tuple(g.name for g in run), params, tensors, sum(g.num_params for g in run)))
    return segments


def _min_max_cuts(sizes: Sequence[int], parts: int) -> list[int]:
    """Cut points (exclusive ends of all but the last run) of the min-max contiguous partition (DP)."""
    n, inf = len(sizes), float("inf")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    cuts, i = [], n
    for k in range(parts, 1, -1):
        i = cut[k][i]
        cuts.append(i)
    return sorted(cuts)


def snake_plan(agents: Sequence[str], groups: Sequence[GroupInfo], rounds: int, mode: str = "p2p") -> Plan:
    """The default plan: one segment per agent per round, rotating over rounds."""
    if not agents:
        raise ValueError("a plan needs at least one agent")
    if rounds < 1:
        raise ValueError("a plan needs at least one round")
    if mode not in ("p2p", "cs"):
        raise ValueError(f"unknown mode {mode!r}; use p2p or cs")
    segments = split_segments(groups, min(len(agents), len(groups)))
    count = len(segments)
    phase = (count - 1 - (len(agents) - 1) - (rounds - 1)) % count  # the last hop trains segment count - 1
    hops = []
    for r in range(rounds):
        for i, agent in enumerate(agents):
            hops.append(PlannedHop(r, len(hops), agent, (i + r + phase) % count))
    return Plan(mode, tuple(segments), tuple(hops), layout=tuple((g.name, g.params) for g in groups))


def fedavg_plan(agents: Sequence[str], groups: Sequence[GroupInfo], rounds: int) -> Plan:
    """FedAvg baseline: every agent trains the whole model (one segment) every round, in parallel."""
    if not agents or rounds < 1:
        raise ValueError("a plan needs at least one agent and one round")
    segments = split_segments(groups, 1)
    hops = [PlannedHop(r, r * len(agents) + i, a, 0) for r in range(rounds) for i, a in enumerate(agents)]
    return Plan("cs", tuple(segments), tuple(hops), algorithm="fedavg")


@dataclass(frozen=True)
class HopSettings:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    max_steps: int | None
    checkpoints: bool = False  # the last hop of every round sends the coordinator a copy
    kd_alpha: float = 0.0  # knowledge distillation weight (0 = off)
    kd_temperature: float = 2.0


def artifact_kind(backend: str) -> str:
    """The artifact bundle a trainer backend runs: portable graphs for ``portable``, ORT training otherwise."""
    return "portable" if backend == "portable" else "ort"


def hop_tasks(
    plan: Plan,
    artifacts: Mapping[tuple[int, str], tuple[str, int]],
    settings: HopSettings,
    backends: Mapping[str, str] | None = None,
) -> dict[str, list[HopTask]]:
    """Per agent, its HopTasks; ``artifacts`` maps (segment, kind) -> (sha256, size), ``backends``
    agent -> the backend its hello names."""
    out: dict[str, list[HopTask]] = {}
    for h in plan.hops:
        if plan.mode == "cs" or plan.algorithm == "fedavg":
            prev = nxt = COORDINATOR
        else:
            prev = plan.hops[h.hop - 1].agent if h.hop > 0 else COORDINATOR
            nxt = plan.hops[h.hop + 1].agent if h.hop + 1 < len(plan.hops) else COORDINATOR
        seg = plan.segments[h.segment]
        sha, size = artifacts[h.segment, artifact_kind((backends or {}).get(h.agent, "ort"))]
        if not plan.layout:
            holds: dict[str, int] = {}  # whole models travel (FedAvg)
        elif plan.mode == "cs":
            holds = plan.versions_after(h.hop - 1)  # the coordinator holds the model it sent this hop
        else:
            holds = plan.held_by(h.hop + 1) if h.hop + 1 < len(plan.hops) else {}
        round_end = h.hop + 1 == len(plan.hops) or plan.hops[h.hop + 1].round != h.round
        task = HopTask(
            h.round, h.hop, h.segment, list(seg.groups), list(seg.tensors), sha, size, prev, nxt,
            settings.epochs, settings.batch_size, settings.lr, settings.seed + h.hop, settings.max_steps,
            settings.checkpoints and round_end and plan.algorithm == "snake" and plan.mode == "p2p",
            settings.kd_alpha, settings.kd_temperature, holds,
        )  # fmt: skip
        out.setdefault(h.agent, []).append(task)
    return out
