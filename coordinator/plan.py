"""What a plan is: layer groups, segments, agent profiles and the planned hops. Data, no logic
beyond describing itself (:mod:`coordinator.scheduler` builds plans)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from coordinator.errors import ConfigError
from edge_agent.protocol.delta import INITIAL


@dataclass(frozen=True)
class GroupInfo:
    name: str
    params: tuple[str, ...]  # trainable parameter names
    buffers: tuple[str, ...]  # other float tensors (BN running stats)
    num_params: int  # scalar parameter count
    num_buffer_elems: int = 0  # scalars held but never trained: buffers, and ``frozen`` parameters (LoRA)
    act_bytes: int = 0  # per sample, kept for backward (coordinator.costs)
    flops: int = 0  # per sample, forward
    frozen: tuple[str, ...] = ()  # parameters no segment trains (LoRA: the base weights under the adapters)


FROZEN_GROUP = "frozen"  # the layout entry of every frozen parameter: version INITIAL for the whole trial


def versioned_layout(groups: Sequence[GroupInfo]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What a snake trial's transfers version: each group's trained parameters, and one entry holding every
    frozen parameter. That entry never gets a newer version, so it travels to an agent once (when it holds
    nothing) and never again: with LoRA, only adapters travel after that."""
    frozen = tuple(name for g in groups for name in g.frozen)
    if FROZEN_GROUP in {g.name for g in groups}:
        raise ValueError(f"a layer group may not be called {FROZEN_GROUP!r}")
    return tuple((g.name, g.params) for g in groups) + (((FROZEN_GROUP, frozen),) if frozen else ())


@dataclass(frozen=True)
class Segment:
    index: int
    groups: tuple[str, ...]
    params: tuple[str, ...]  # trainable in this segment's artifacts
    tensors: tuple[str, ...]  # every tensor the segment owns (params + buffers)
    num_params: int


@dataclass(frozen=True)
class AgentProfile:
    """What the planner knows of an agent (from its hello): budget, idle footprint, speed, backend."""

    agent: str
    budget_mb: float = 0.0  # 0 = no limit known
    baseline_mb: float = 0.0  # resident when idle, runtime imported
    gflops: float | None = None  # calibrated speed; None = unknown (all unknown: equal speeds)
    backend: str = "ort"
    samples: int = 0  # training samples per hop (0 = unknown: time estimates are per sample)
    data_mb: float = 0.0  # its local data as stored, when its baseline does not include it


@dataclass(frozen=True)
class PlannedHop:
    round: int
    hop: int  # global index
    agent: str
    segment: int
    est_mb: float = 0.0  # estimated agent peak RSS during the hop
    est_s: float = 0.0  # estimated compute time of the hop


@dataclass(frozen=True)
class SkewMethods:
    """What the trial does against label skew, and why."""

    skew: float  # sample-weighted mean total variation distance of the agents' label mixes from the fleet's
    active: bool  # the methods below are on
    kd_alpha: float = 0.0  # distillation weight every hop uses
    logit_adjust: float = 0.0  # tau
    bn_mix: float = 0.0  # weight of a hop's BatchNorm statistics
    reason: str = ""

    def describe(self) -> str:
        on = [f"distillation (alpha {self.kd_alpha:g})"] if self.kd_alpha > 0 else []
        on += [f"logit adjustment (tau {self.logit_adjust:g})"] if self.logit_adjust > 0 else []
        on += [f"BatchNorm statistics mixing (w {self.bn_mix:g})"] if self.bn_mix > 0 else []
        return f"label skew {self.skew:.2f}: {self.reason}; " + (", ".join(on) if on else "no label-skew methods")


@dataclass(frozen=True)
class Plan:
    mode: str  # "p2p" | "cs"
    segments: tuple[Segment, ...]
    hops: tuple[PlannedHop, ...]
    algorithm: str = "snake"  # "snake" | "fedavg" | "split" (agents train segment 0, the coordinator 1)
    excluded: tuple[tuple[str, str], ...] = ()  # (agent, reason): agents the plan leaves out
    layout: tuple[tuple[str, tuple[str, ...]], ...] = ()  # versioned layer groups and their parameters (snake)
    skew: SkewMethods | None = None  # the label-skew methods every hop uses (coordinator.skew); None: none known
    notes: tuple[str, ...] = ()  # why the plan is as it is, beyond the route (e.g. the agents' label mixes)

    def groups(self) -> dict[str, list[str]]:
        """Layer group -> parameter names: what a model transfer versions (empty: whole models travel)."""
        return {g: list(params) for g, params in self.layout}

    def versions_after(self, hop: int) -> dict[str, int]:
        """Each group's version (the last hop that trained it) once ``hop`` is done; -1: the initial model."""
        last = min(hop, len(self.hops) - 1)
        return dict(zip(self._layout_names, self._versions[last], strict=True)) if last >= 0 else self._initial()

    def held_by(self, hop: int) -> dict[str, int]:
        """The versions the agent of ``hop`` holds on disk when its model arrives: its previous hop's output
        (empty on its first hop: it holds nothing)."""
        before = self._previous[hop]
        return self.versions_after(before) if before is not None else {}

    def _initial(self) -> dict[str, int]:
        return dict.fromkeys(self._layout_names, INITIAL)

    @cached_property
    def _layout_names(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.layout)

    @cached_property
    def _versions(self) -> list[tuple[int, ...]]:
        """Per hop, every layout group's version once it is done (computed once: a trial asks per hop)."""
        current, out = self._initial(), []
        for h in self.hops:
            current.update({g: h.hop for g in self.segments[h.segment].groups if g in current})
            out.append(tuple(current.values()))
        return out

    @cached_property
    def _previous(self) -> list[int | None]:
        """Per hop, its agent's previous hop (None: its first)."""
        last: dict[str, int] = {}
        out: list[int | None] = []
        for h in self.hops:
            out.append(last.get(h.agent))
            last[h.agent] = h.hop
        return out

    @property
    def rounds(self) -> int:
        return 1 + max(h.round for h in self.hops) if self.hops else 0

    def coverage(self, groups: Sequence[str] | None = None) -> dict[str, set[str]]:
        """Layer group -> the agents whose data trains it somewhere in the plan."""
        out: dict[str, set[str]] = {g: set() for g in groups or ()}
        for h in self.hops:
            for g in self.segments[h.segment].groups:
                out.setdefault(g, set()).add(h.agent)
        return out

    def describe(self) -> list[str]:
        """Human-readable lines: the segments, the route per round (with estimates), who is left out."""
        lines = [f"segment {s.index}: {', '.join(s.groups)} ({s.num_params:,} params)" for s in self.segments]
        if self.algorithm == "split":
            lines[0] += ": the front, trained on the agents in turn"
            lines[1] += ": the back, trained on the coordinator for every agent's batches"
        joiner = " | " if self.algorithm == "fedavg" else " -> "  # fedavg: agents train in parallel
        for r in range(self.rounds):
            route = [f"{h.agent}[s{h.segment}{_estimates(h)}]" for h in self.hops if h.round == r]
            lines.append(f"round {r}: " + joiner.join(route))
        agents = {h.agent for h in self.hops}
        missing = [(g, a) for g, met in self.coverage().items() for a in sorted(agents - met)]
        if self.algorithm == "snake":
            total = len(agents) * len(self.coverage())
            detail = ": missing " + ", ".join(f"{g}/{a}" for g, a in missing) if 0 < len(missing) <= 6 else ""
            lines.append(f"coverage: {total - len(missing)} of {total} (layer group, agent) pairs{detail}")
        lines.extend(f"left out: {agent}: {reason}" for agent, reason in self.excluded)
        if self.skew is not None:
            lines.append(self.skew.describe())
        return lines + list(self.notes)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "algorithm": self.algorithm,
            "mode": self.mode,
            "segments": [{"index": s.index, "groups": list(s.groups), "params": s.num_params} for s in self.segments],
            "hops": [
                {
                    "round": h.round,
                    "hop": h.hop,
                    "agent": h.agent,
                    "segment": h.segment,
                    "est_mb": round(h.est_mb, 1),
                    "est_s": round(h.est_s, 2),
                }  # fmt: skip
                for h in self.hops
            ],
            "excluded": [{"agent": a, "reason": r} for a, r in self.excluded],
            "coverage": {g: sorted(a) for g, a in self.coverage().items()},
        }
        if self.skew is not None:
            out |= {"label_skew": dataclasses.asdict(self.skew), "notes": list(self.notes)}
        return out


def _estimates(h: PlannedHop) -> str:
    parts = ([f" ~{h.est_mb:.0f} MiB"] if h.est_mb else []) + ([f" ~{h.est_s:.1f} s"] if h.est_s else [])
    return "".join(parts)


class PlanError(ConfigError):
    """No plan fits the fleet (every agent left out, or no assignment within the budgets)."""


def _segment(index: int, run: Sequence[GroupInfo]) -> Segment:
    params = tuple(p for g in run for p in g.params)
    tensors = tuple(t for g in run for t in (*g.params, *g.buffers))
    return Segment(index, tuple(g.name for g in run), params, tensors, sum(g.num_params for g in run))
