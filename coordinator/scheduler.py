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

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from coordinator import costmodel
from edge_agent.protocol.delta import INITIAL
from edge_agent.protocol.messages import HopTask
from edge_agent.protocol.topics import COORDINATOR

C = TypeVar("C", float, tuple[float, float])  # a run's cost in a min-max split


@dataclass(frozen=True)
class GroupInfo:
    name: str
    params: tuple[str, ...]  # trainable parameter names
    buffers: tuple[str, ...]  # other float tensors (BN running stats)
    num_params: int  # scalar parameter count
    num_buffer_elems: int = 0  # scalar buffer count
    act_bytes: int = 0  # per sample, kept for backward (coordinator.costs)
    flops: int = 0  # per sample, forward


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
    data_mb: float = 0.0  # its local data as float32


@dataclass(frozen=True)
class PlannedHop:
    round: int
    hop: int  # global index
    agent: str
    segment: int
    est_mb: float = 0.0  # estimated agent peak RSS during the hop
    est_s: float = 0.0  # estimated compute time of the hop


@dataclass(frozen=True)
class Plan:
    mode: str  # "p2p" | "cs"
    segments: tuple[Segment, ...]
    hops: tuple[PlannedHop, ...]
    algorithm: str = "snake"  # "snake" | "fedavg" | "split" (agents train segment 0, the coordinator 1)
    excluded: tuple[tuple[str, str], ...] = ()  # (agent, reason): agents the plan leaves out
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
        return lines

    def as_dict(self) -> dict[str, object]:
        return {
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


def _estimates(h: PlannedHop) -> str:
    parts = ([f" ~{h.est_mb:.0f} MiB"] if h.est_mb else []) + ([f" ~{h.est_s:.1f} s"] if h.est_s else [])
    return "".join(parts)


class PlanError(ValueError):
    """No plan fits the fleet (every agent left out, or no assignment within the budgets)."""


def _segment(index: int, run: Sequence[GroupInfo]) -> Segment:
    params = tuple(p for g in run for p in g.params)
    tensors = tuple(t for g in run for t in (*g.params, *g.buffers))
    return Segment(index, tuple(g.name for g in run), params, tensors, sum(g.num_params for g in run))


def split_segments(groups: Sequence[GroupInfo], parts: int) -> list[Segment]:
    """Contiguous partition of ``groups`` into ``parts`` runs minimising the largest parameter count."""
    if not 1 <= parts <= len(groups):
        raise ValueError(f"cannot split {len(groups)} layer groups into {parts} segments")
    cuts = _min_max_cuts([g.num_params for g in groups], parts)
    return [_segment(i, groups[lo:hi]) for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(groups)], strict=True))]


def _min_max_cuts(sizes: Sequence[int], parts: int) -> list[int]:
    """Cut points (exclusive ends of all but the last run) of the min-max contiguous partition (DP)."""
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    cuts = _min_max_split(len(sizes), parts, lambda k, lo, hi: float(prefix[hi] - prefix[lo]))
    assert cuts is not None  # no constraint can fail
    return cuts[1]


def _min_max_split(n: int, parts: int, cost: Callable[[int, int, int], C]) -> tuple[C, list[int]] | None:
    """Split ``n`` items into ``parts`` contiguous non-empty runs, run ``k`` costing ``cost(k, lo, hi)``
    (a float or a tuple of floats, compared in order; ``inf`` in it = not allowed), minimising the largest
    cost: (that cost, cut points) or None."""
    best: list[list[C | None]] = [[None] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                before = best[k - 1][j]
                if before is None if k > 1 else j > 0:  # the first run starts at item 0
                    continue
                value = cost(k - 1, j, i)
                if _forbidden(value):
                    continue
                if before is not None and before > value:
                    value = before
                now = best[k][i]
                if now is None or value < now:
                    best[k][i], cut[k][i] = value, j
    found = best[parts][n]
    if found is None:
        return None
    cuts, i = [], n
    for k in range(parts, 1, -1):
        i = cut[k][i]
        cuts.append(i)
    return found, sorted(cuts)


def _forbidden(value: float | tuple[float, ...]) -> bool:
    return math.isinf(value) if isinstance(value, float) else any(math.isinf(v) for v in value)


@dataclass
class _Costs:
    """Per agent, the estimated memory and time of training each run of groups ``[lo, hi)``."""

    groups: Sequence[GroupInfo]
    batch: int
    optimizer: str

    def __post_init__(self) -> None:
        self.memo: dict[tuple[str, int, int], tuple[float, float]] = {}

    def of(self, p: AgentProfile, lo: int, hi: int) -> tuple[float, float]:
        key = (p.agent, lo, hi)
        if key not in self.memo:
            mem = costmodel.hop_memory_mb(
                self.groups, lo, hi, self.batch, p.baseline_mb, self.optimizer, p.backend, p.data_mb
            )
            seconds = costmodel.hop_seconds(self.groups, lo, hi, max(p.samples, 1), p.gflops)
            self.memo[key] = (mem, seconds)
        return self.memo[key]

    def fits(self, p: AgentProfile, lo: int, hi: int) -> bool:
        return p.budget_mb <= 0 or self.of(p, lo, hi)[0] <= p.budget_mb


SAME_SPEED = 2.0  # calibrations within this factor of the fleet's median count as the median


def _profiles(agents: Sequence[str | AgentProfile]) -> list[AgentProfile]:
    """Profiles with planning speeds: an uncalibrated agent counts as a typical one, and speeds within
    ``SAME_SPEED`` of the median as the median. Identical agents calibrating at once on one shared
    2-core machine (simulate, while the coordinator exports) read 61-118 GFLOP/s; taken literally,
    that noise outweighed rotation and cost transfers. Boards of different generations differ by
    more (a Raspberry Pi 4 and a Jetson Orin: several times)."""
    profiles = [a if isinstance(a, AgentProfile) else AgentProfile(a) for a in agents]
    known = sorted(p.gflops for p in profiles if p.gflops)
    if not known:
        return profiles
    typical = known[len(known) // 2]

    def speed(g: float | None) -> float:
        return typical if not g or 1 / SAME_SPEED <= g / typical <= SAME_SPEED else g

    return [dataclasses.replace(p, gflops=speed(p.gflops)) for p in profiles]


TIME_SLACK = 1.25  # assignments within 25 % of the fastest round time count as equally fast (calibration noise)
# Among equally fast assignments, the largest hop's memory (relative to its agent's budget, counted in
# MEMORY_STEP_MB steps of the sweep's largest budget) is minimised first, then the largest parameters-per-
# speed share. A front segment keeps the activations of every layer after it, so the memory-balanced
# plan gives it few parameters.
MEMORY_STEP_MB = 5.0
MEMORY_SLACK = 1.05  # rotation may cost the largest hop this much memory, no more (a big front segment may not)
Balance = tuple[float, float]  # (memory share step, parameters per GFLOP/s) of one hop


def snake_plan(
    agents: Sequence[str | AgentProfile],
    groups: Sequence[GroupInfo],
    rounds: int,
    mode: str = "p2p",
    batch: int = 64,
    optimizer: str = "adamw",
) -> Plan:
    """Capability-aware Snake Learning plan.

    Every round, each agent trains one contiguous segment and the hops run from the input-side
    segment to the output side (so every round, and the trial, ends on the classifier). The
    segments are chosen per round: among the orders of agents along the layers, the planner
    keeps those whose slowest hop is within ``TIME_SLACK`` of the fastest possible, prefers the
    one that brings layer groups to agents whose data they have not met yet (rotation) among
    those whose largest hop needs at most ``MEMORY_SLACK`` times the least memory possible (for
    its agent's budget; the front segment keeps every later activation, so it gets few
    parameters), then the one whose hops receive the fewest changed parameters (only what changed
    since an agent's last hop travels to it), then the one whose largest hop needs the least
    memory, then the one whose largest
    parameters-per-speed share is smallest (a slow agent gets fewer or lighter layers); every hop
    must fit its agent's memory budget. An agent that cannot train even
    the cheapest group within its budget is left out with the reason. With more agents than groups,
    a round is several sweeps over the layers, each agent training once per round.
    """
    if not agents:
        raise ValueError("a plan needs at least one agent")
    if rounds < 1:
        raise ValueError("a plan needs at least one round")
    if mode not in ("p2p", "cs"):
        raise ValueError(f"unknown mode {mode!r}; use p2p or cs")
    costs = _Costs(groups, batch, optimizer)
    n = len(groups)
    fleet, excluded = [], []
    for p in _profiles(agents):
        cheapest = min(costs.of(p, g, g + 1)[0] for g in range(n))
        if p.budget_mb > 0 and cheapest > p.budget_mb:
            excluded.append((p.agent, f"training even its lightest layer group needs about {cheapest:.0f} MiB "
                                      f"(the whole model is held for the forward pass); its budget is "
                                      f"{p.budget_mb:.0f} MiB"))  # fmt: skip
        else:
            fleet.append(p)
    if not fleet:
        raise PlanError("no agent can train any layer group: " + "; ".join(f"{a}: {r}" for a, r in excluded))
    covered: set[tuple[str, int]] = set()
    runs: dict[tuple[int, int], int] = {}
    hops: list[tuple[int, AgentProfile, int, int]] = []
    for r in range(rounds):
        shift = r % len(fleet)
        rotated = fleet[shift:] + fleet[:shift]
        sweeps = -(-len(fleet) // n)
        for s in range(sweeps):
            members = rotated[s::sweeps]
            history = [(p.agent, lo, hi) for _, p, lo, hi in hops]
            order, cuts = _best_sweep(members, costs, n, covered, r, history)
            for p, lo, hi in zip(order, [0, *cuts], [*cuts, n], strict=True):
                covered.update((p.agent, g) for g in range(lo, hi))
                runs.setdefault((lo, hi), len(runs))
                hops.append((r, p, lo, hi))
    index = {run: i for i, run in enumerate(sorted(runs))}
    segments = tuple(_segment(index[run], groups[run[0] : run[1]]) for run in sorted(runs))
    planned = tuple(
        PlannedHop(r, i, p.agent, index[lo, hi], *(costs.of(p, lo, hi) if p.baseline_mb or p.gflops else (0.0, 0.0)))
        for i, (r, p, lo, hi) in enumerate(hops)
    )
    return Plan(mode, segments, planned, excluded=tuple(excluded), layout=tuple((g.name, g.params) for g in groups))


def _sent_params(hops: Sequence[tuple[str, int, int]], first: int, groups: Sequence[GroupInfo]) -> int:
    """Parameters the hops from index ``first`` on receive: every group whose version differs from the
    copy the receiving agent kept after its previous hop (all of them on its first hop)."""
    version = [-1] * len(groups)  # per group, the hop that trained it last
    held: dict[str, list[int]] = {}  # per agent, the versions of the model it handed on last
    total = 0
    for i, (agent, lo, hi) in enumerate(hops):
        if i >= first:
            mine = held.get(agent)
            total += sum(g.num_params for k, g in enumerate(groups) if mine is None or mine[k] != version[k])
        version[lo:hi] = [i] * (hi - lo)
        held[agent] = list(version)
    return total


def _best_sweep(
    members: list[AgentProfile],
    costs: _Costs,
    n: int,
    covered: set[tuple[str, int]],
    round_: int,
    history: Sequence[tuple[str, int, int]] = (),
) -> tuple[list[AgentProfile], list[int]]:
    """The agents' order along the layers and the cut points for one sweep (see ``snake_plan``)."""
    m = min(len(members), n)
    if m < len(members):  # more agents than groups in one sweep cannot happen (sweeps split them)
        members = members[:m]
    if m <= 5:
        orders = [list(o) for o in itertools.permutations(members)]
    else:
        orders = [members[i:] + members[:i] for i in range(m)]
        orders += [o[::-1] for o in orders]
    candidates = []
    for k, order in enumerate(orders):

        def hop_time(j: int, lo: int, hi: int, o: list[AgentProfile] = order) -> float:
            return costs.of(o[j], lo, hi)[1] if costs.fits(o[j], lo, hi) else float("inf")

        timed = _min_max_split(n, m, hop_time)
        if timed is None:
            continue
        candidates.append((timed[0], k, order))
    if not candidates:
        names = ", ".join(f"{p.agent} ({p.budget_mb:.0f} MiB)" for p in members)
        raise PlanError(f"round {round_}: no assignment of the layers to {names} fits their memory budgets")
    fastest = min(t for t, _, _ in candidates)
    reference = max(p.budget_mb for p in members)
    balanced: list[tuple[Balance, int, list[AgentProfile], list[int]]] = []
    for seconds, k, order in candidates:
        if seconds > fastest * TIME_SLACK + 1e-12:
            continue
        limit = max(seconds, fastest) * TIME_SLACK + 1e-12

        def share(j: int, lo: int, hi: int, o: list[AgentProfile] = order, limit: float = limit) -> Balance:
            p = o[j]
            mem, hop_s = costs.of(p, lo, hi)
            if not costs.fits(p, lo, hi) or hop_s > limit:
                return (float("inf"), float("inf"))
            pressure = round(mem * (reference / p.budget_mb if p.budget_mb > 0 else 1.0) / MEMORY_STEP_MB)
            return (float(pressure), sum(g.num_params for g in costs.groups[lo:hi]) / (p.gflops or 1.0))

        split = _min_max_split(n, m, share)
        if split is not None:
            balanced.append((split[0], k, order, split[1]))
    assert balanced  # the fastest candidate always passes its own limit
    lightest = min(b[0][0] for b in balanced)

    def key(b: tuple[Balance, int, list[AgentProfile], list[int]]) -> tuple[float, int, Balance, int]:
        worst, k, order, cuts = b
        runs = [(p.agent, lo, hi) for p, lo, hi in zip(order, [0, *cuts], [*cuts, n], strict=True)]
        fresh = sum((agent, g) not in covered for agent, lo, hi in runs for g in range(lo, hi))
        return (-float(fresh), _sent_params([*history, *runs], len(history), costs.groups), worst, k)

    # rotation only among assignments whose largest hop is within MEMORY_SLACK of the lightest possible
    _, _, order, cuts = min((b for b in balanced if b[0][0] <= lightest * MEMORY_SLACK + 1), key=key)
    return order, cuts


def fedavg_plan(
    agents: Sequence[str | AgentProfile],
    groups: Sequence[GroupInfo],
    rounds: int,
    batch: int = 64,
    optimizer: str = "adamw",
) -> Plan:
    """FedAvg baseline: every agent trains the whole model (one segment) every round, in parallel.
    An agent whose memory budget cannot hold the whole model's training state is left out, with why."""
    if not agents or rounds < 1:
        raise ValueError("a plan needs at least one agent and one round")
    costs = _Costs(groups, batch, optimizer)
    n = len(groups)
    fleet, excluded = [], []
    for p in _profiles(agents):
        if costs.fits(p, 0, n):
            fleet.append(p)
        else:
            need = costs.of(p, 0, n)[0]
            excluded.append((p.agent, f"unable to train: the whole model's training state needs about {need:.0f} MiB; "
                                      f"its budget is {p.budget_mb:.0f} MiB"))  # fmt: skip
    if not fleet:
        raise PlanError("no agent can train the whole model: " + "; ".join(f"{a}: {r}" for a, r in excluded))
    hops = [
        PlannedHop(r, r * len(fleet) + i, p.agent, 0, *(costs.of(p, 0, n) if p.baseline_mb or p.gflops else (0.0, 0.0)))
        for r in range(rounds)
        for i, p in enumerate(fleet)
    ]
    return Plan("cs", (_segment(0, groups),), tuple(hops), algorithm="fedavg", excluded=tuple(excluded))


def cut_segments(groups: Sequence[GroupInfo], cut: str) -> tuple[Segment, Segment]:
    """Split learning: (front, back) where the front ends with layer group ``cut``."""
    names = [g.name for g in groups]
    if cut not in names[:-1]:
        raise ValueError(f"cannot cut after layer group {cut!r}; choose one of: {', '.join(names[:-1])}")
    at = names.index(cut) + 1
    return _segment(0, groups[:at]), _segment(1, groups[at:])


def split_plan(agents: Sequence[str | AgentProfile], groups: Sequence[GroupInfo], rounds: int, cut: str) -> Plan:
    """Split learning baseline (vanilla, sequential): every round the agents train the front in route order,
    batch by batch with the coordinator, which trains the back; the front passes via the coordinator."""
    if not agents or rounds < 1:
        raise ValueError("a plan needs at least one agent and one round")
    names = [a if isinstance(a, str) else a.agent for a in agents]
    front, back = cut_segments(groups, cut)
    hops = [PlannedHop(r, r * len(names) + i, a, 0) for r in range(rounds) for i, a in enumerate(names)]
    return Plan("cs", (front, back), tuple(hops), algorithm="split")


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
    gradient_timeout_s: float = 60.0  # split learning: per batch


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
            settings.kd_alpha, settings.kd_temperature, plan.algorithm == "split", settings.gradient_timeout_s,
            holds,
        )  # fmt: skip
        out.setdefault(h.agent, []).append(task)
    return out
