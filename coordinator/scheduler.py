"""Trial plans: which agent trains which segment, in which order. Pure functions.

A **segment** is a contiguous run of layer groups. A Snake Learning plan (``snake_plan``) is
built round by round from the agents' profiles (memory budget, idle footprint, calibrated speed,
backend) and the cost model (:mod:`coordinator.costmodel`): every agent trains one segment per
round, the hops run from the input side to the output side (so every round, and the trial, ends
on the classifier: finishing on a middle segment left the classifier matched to features that
just moved and cost about 0.015-0.02 test accuracy on Fashion-MNIST/cnn), and among the
assignments that keep hop times within ``TIME_SLACK`` and the largest hop's memory within
``MEMORY_SLACK`` of the best, the planner prefers rotation (layer groups meet agents whose data
they have not met), then fewer parameters on the wire, then memory, then a lighter share for a
slower agent. ``fedavg_plan`` and ``split_plan`` build the baselines' plans; ``hop_tasks`` turns a
plan into what each agent is told.

Planning time grows linearly with the fleet (1,000 agents: well under a second): cost estimates and
splits are memoised per kind of agent (alike profiles), not per agent, and what each candidate sweep
would put on the wire is counted from the copies agents hold after the hops planned so far
(``_Copies``), not by replaying the plan from its first hop for every candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from coordinator import costmodel
from coordinator.plan import AgentProfile, GroupInfo, Plan, PlanError, PlannedHop, Segment, _segment, versioned_layout
from edge_agent.protocol.messages import HopTask
from edge_agent.protocol.topics import COORDINATOR

C = TypeVar("C", float, tuple[float, float])  # a run's cost in a min-max split


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
    """Per agent, the estimated memory and time of training each run of groups ``[lo, hi)``, and the
    min-max splits of the layers over an order of agents. Both depend on an agent's profile but not
    on its name, so a fleet of many alike agents computes each once: agents are numbered by **kind**
    (alike profiles, one number) and the memos are keyed by kinds."""

    groups: Sequence[GroupInfo]
    batch: int
    optimizer: str

    def __post_init__(self) -> None:
        self.profiles: list[AgentProfile] = []  # per kind, the profile without a name
        self.kinds: dict[AgentProfile, int] = {}  # nameless profile -> its kind
        self.kind_of: dict[str, int] = {}  # agent -> its kind (agents' names are unique)
        self.memo: dict[tuple[int, int, int], tuple[float, float]] = {}
        self.timed: dict[tuple[int, ...], tuple[float, list[int]] | None] = {}  # fastest split per kinds
        self.balanced: dict[tuple[tuple[int, ...], float, float], tuple[Balance, list[int]] | None] = {}
        self.params = [0]  # parameters of groups [0, i)
        for g in self.groups:
            self.params.append(self.params[-1] + g.num_params)

    def kind(self, p: AgentProfile) -> int:
        if p.agent not in self.kind_of:
            nameless = dataclasses.replace(p, agent="")
            if nameless not in self.kinds:
                self.kinds[nameless] = len(self.profiles)
                self.profiles.append(nameless)
            self.kind_of[p.agent] = self.kinds[nameless]
        return self.kind_of[p.agent]

    def of(self, p: AgentProfile, lo: int, hi: int) -> tuple[float, float]:
        """(peak MiB, seconds) of ``p`` training groups ``[lo, hi)``."""
        return self._cost(self.kind(p), lo, hi)

    def fits(self, p: AgentProfile, lo: int, hi: int) -> bool:
        return self._fits(self.kind(p), lo, hi)

    def _cost(self, kind: int, lo: int, hi: int) -> tuple[float, float]:
        key = (kind, lo, hi)
        if key not in self.memo:
            p = self.profiles[kind]
            mem = costmodel.hop_memory_mb(
                self.groups, lo, hi, self.batch, p.baseline_mb, self.optimizer, p.backend, p.data_mb
            )
            seconds = costmodel.hop_seconds(self.groups, lo, hi, max(p.samples, 1), p.gflops)
            self.memo[key] = (mem, seconds)
        return self.memo[key]

    def _fits(self, kind: int, lo: int, hi: int) -> bool:
        budget = self.profiles[kind].budget_mb
        return budget <= 0 or self._cost(kind, lo, hi)[0] <= budget

    def fastest(self, kinds: tuple[int, ...]) -> tuple[float, list[int]] | None:
        """The split of the layers over agents of ``kinds`` (in order, the first on the input side) whose
        slowest hop is fastest, every hop within its agent's budget: (that hop's seconds, cut points) or None."""

        def hop_time(j: int, lo: int, hi: int) -> float:
            return self._cost(kinds[j], lo, hi)[1] if self._fits(kinds[j], lo, hi) else float("inf")

        if kinds not in self.timed:
            self.timed[kinds] = _min_max_split(len(self.groups), len(kinds), hop_time)
        return self.timed[kinds]

    def lightest(self, kinds: tuple[int, ...], limit: float, reference: float) -> tuple[Balance, list[int]] | None:
        """The split over agents of ``kinds`` whose largest hop has the smallest :data:`Balance` (memory share
        of ``reference`` MiB, then parameters per speed), every hop within its budget and ``limit`` seconds."""

        def share(j: int, lo: int, hi: int) -> Balance:
            p = self.profiles[kinds[j]]
            mem, hop_s = self._cost(kinds[j], lo, hi)
            if not self._fits(kinds[j], lo, hi) or hop_s > limit:
                return (float("inf"), float("inf"))
            pressure = round(mem * (reference / p.budget_mb if p.budget_mb > 0 else 1.0) / MEMORY_STEP_MB)
            return (float(pressure), (self.params[hi] - self.params[lo]) / (p.gflops or 1.0))

        key = (kinds, limit, reference)
        if key not in self.balanced:
            self.balanced[key] = _min_max_split(len(self.groups), len(kinds), share)
        return self.balanced[key]


SAME_SPEED = 2.0  # calibrations within this factor of the fleet's median count as the median
SAME_FOOTPRINT = 1.1  # idle footprints within this factor of the fleet's median count as alike


def _profiles(agents: Sequence[str | AgentProfile]) -> list[AgentProfile]:
    """Profiles as the planner uses them, with measurement noise taken out so that alike agents plan alike.

    * **Speed**: an uncalibrated agent counts as a typical one, and speeds within ``SAME_SPEED`` of the
      median as the median. Identical agents calibrating at once on one shared 2-core machine (simulate,
      while the coordinator exports) read 61-118 GFLOP/s; taken literally, that noise outweighed
      rotation and cost transfers. Boards of different generations differ by more (a Raspberry Pi 4
      and a Jetson Orin: several times).
    * **Idle footprint**: footprints within ``SAME_FOOTPRINT`` of the median count as the largest of
      them (erring towards more memory, never less). Identical agents report idle footprints a few MiB
      apart (allocator, import timing); taken literally, a difference of 2 MiB moved hops across a
      memory step and gave identical simulated fleets 16 different routes, so a comparison's seeds
      trained different routes from run to run. An agent of another backend or with a real extra
      load differs by more and keeps its own figure.
    """
    profiles = [a if isinstance(a, AgentProfile) else AgentProfile(a) for a in agents]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else 0.0

    def near(value: float, ref: float, factor: float) -> bool:
        return ref > 0 and 1 / factor <= value / ref <= factor

    typical = median([p.gflops for p in profiles if p.gflops])

    def speed(g: float | None) -> float | None:
        return typical if typical and (not g or near(g, typical, SAME_SPEED)) else g

    usual = median([p.baseline_mb for p in profiles if p.baseline_mb > 0])
    shared = max((p.baseline_mb for p in profiles if near(p.baseline_mb, usual, SAME_FOOTPRINT)), default=0.0)

    def footprint(mb: float) -> float:
        return shared if near(mb, usual, SAME_FOOTPRINT) else mb

    return [dataclasses.replace(p, gflops=speed(p.gflops), baseline_mb=footprint(p.baseline_mb)) for p in profiles]


TIME_SLACK = 1.25  # assignments within 25 % of the fastest round time count as equally fast (calibration noise)
# Among equally fast assignments, the largest hop's memory (relative to its agent's budget, counted in
# MEMORY_STEP_MB steps of the sweep's largest budget) is minimised first, then the largest parameters-per-
# speed share. A front segment keeps the activations of every layer after it, so the memory-balanced
# plan gives it few parameters.
MEMORY_STEP_MB = 5.0
MEMORY_SLACK = 1.05  # rotation may cost the largest hop this much memory, no more (a big front segment may not)
# label mix distances (total variation, 0..1) within this of the closest count as alike when the trial's last hop
# is given to the agent closest to the fleet's mix: 3,000-sample IID shares already differ by about 0.03
HEAD_TOLERANCE = 0.05
Balance = tuple[float, float]  # (memory share step, parameters per GFLOP/s) of one hop


def snake_plan(
    agents: Sequence[str | AgentProfile],
    groups: Sequence[GroupInfo],
    rounds: int,
    mode: str = "p2p",
    batch: int = 64,
    optimizer: str = "adamw",
    head_by: Mapping[str, float] | None = None,
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
    must fit its agent's memory budget. With ``head_by`` (agent -> how far its label mix is from the
    fleet's, :func:`coordinator.skew.distances`) the trial's last hop, which leaves the classifier as the
    final model has it, goes to the closest agent of the last sweep among the orders within the time and
    memory limits, before rotation is weighed (agents within ``HEAD_TOLERANCE`` of the closest count as
    alike: a few points of distance are sampling noise, and rotation then decides as without labels). An agent that cannot train even
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
    copies = _Copies(groups)
    runs: dict[tuple[int, int], int] = {}
    hops: list[tuple[int, AgentProfile, int, int]] = []
    for r in range(rounds):
        shift = r % len(fleet)
        rotated = fleet[shift:] + fleet[:shift]
        sweeps = -(-len(fleet) // n)
        for s in range(sweeps):
            members = rotated[s::sweeps]
            final = head_by if (r, s) == (rounds - 1, sweeps - 1) else None
            order, cuts = _best_sweep(members, costs, covered, r, copies, final)
            for p, lo, hi in zip(order, [0, *cuts], [*cuts, n], strict=True):
                covered.update((p.agent, g) for g in range(lo, hi))
                copies.add(p.agent, lo, hi)
                runs.setdefault((lo, hi), len(runs))
                hops.append((r, p, lo, hi))
    index = {run: i for i, run in enumerate(sorted(runs))}
    segments = tuple(_segment(index[run], groups[run[0] : run[1]]) for run in sorted(runs))
    planned = tuple(
        PlannedHop(r, i, p.agent, index[lo, hi], *(costs.of(p, lo, hi) if p.baseline_mb or p.gflops else (0.0, 0.0)))
        for i, (r, p, lo, hi) in enumerate(hops)
    )
    return Plan(mode, segments, planned, excluded=tuple(excluded), layout=versioned_layout(groups))


class _Copies:
    """The version of every layer group (the hop that trained it last) after the hops planned so far, and
    the versions each agent kept from its last hop: what the next hops would receive. Kept as the plan
    grows, so weighing a sweep's candidates costs the sweep's hops, not the whole history's."""

    def __init__(self, groups: Sequence[GroupInfo]) -> None:
        self.sizes = [g.num_params for g in groups]
        self.version = [-1] * len(groups)
        self.held: dict[str, list[int]] = {}  # per agent, the versions of the model it handed on last
        self.hops = 0

    def add(self, agent: str, lo: int, hi: int) -> None:
        """Plan the next hop: ``agent`` trains groups ``[lo, hi)``."""
        self.version[lo:hi] = [self.hops] * (hi - lo)
        self.held[agent] = list(self.version)
        self.hops += 1

    def received(self, runs: Sequence[tuple[str, int, int]]) -> int:
        """Parameters the hops ``runs`` (agent, lo, hi), if planned next, would receive: every group whose
        version differs from the copy the receiving agent kept after its previous hop (all on its first)."""
        version, held, total = list(self.version), dict[str, list[int]](), 0
        for i, (agent, lo, hi) in enumerate(runs, self.hops):
            mine = held.get(agent, self.held.get(agent))
            stale = (
                self.sizes if mine is None else [s for s, v, h in zip(self.sizes, version, mine, strict=True) if v != h]
            )
            total += sum(stale)
            version[lo:hi] = [i] * (hi - lo)
            held[agent] = list(version)
        return total


def _sent_params(hops: Sequence[tuple[str, int, int]], first: int, groups: Sequence[GroupInfo]) -> int:
    """Parameters the hops from index ``first`` on receive (see :meth:`_Copies.received`)."""
    copies = _Copies(groups)
    for hop in hops[:first]:
        copies.add(*hop)
    return copies.received(hops[first:])


class _Candidate(NamedTuple):
    """One order of a sweep's agents along the layers and its best split."""

    k: int  # the order's place among those tried (the last tie-break)
    order: tuple[int, ...]  # indices of the sweep's members, input side first
    kinds: tuple[int, ...]  # their kinds (``_Costs.kind``)
    seconds: float = 0.0  # the slowest hop of the fastest split
    worst: Balance = (0.0, 0.0)  # the largest hop's balance in the lightest split within the time limit
    cuts: tuple[int, ...] = ()  # that split's cut points


def _best_sweep(
    members: list[AgentProfile],
    costs: _Costs,
    covered: set[tuple[str, int]],
    round_: int,
    copies: _Copies,
    head_by: Mapping[str, float] | None = None,
) -> tuple[list[AgentProfile], list[int]]:
    """The agents' order along the layers and the cut points for one sweep (see ``snake_plan``); with
    ``head_by``, the sweep's last hop goes to a member within ``HEAD_TOLERANCE`` of the smallest value."""
    n = len(costs.groups)
    members = members[:n]  # more agents than groups in one sweep cannot happen (sweeps split them)
    m, kind = len(members), [costs.kind(p) for p in members]
    if m <= 5:
        orders = list(itertools.permutations(range(m)))
    else:
        orders = [(*range(i, m), *range(i)) for i in range(m)]
        orders += [o[::-1] for o in orders]
    timed = []
    for k, order in enumerate(orders):
        kinds = tuple(kind[i] for i in order)
        fast = costs.fastest(kinds)
        if fast is not None:
            timed.append(_Candidate(k, order, kinds, fast[0]))
    if not timed:
        names = ", ".join(f"{p.agent} ({p.budget_mb:.0f} MiB)" for p in members)
        raise PlanError(f"round {round_}: no assignment of the layers to {names} fits their memory budgets")
    fastest = min(c.seconds for c in timed)
    reference = max(p.budget_mb for p in members)
    balanced = []
    for c in timed:
        if c.seconds > fastest * TIME_SLACK + 1e-12:
            continue
        light = costs.lightest(c.kinds, max(c.seconds, fastest) * TIME_SLACK + 1e-12, reference)
        if light is not None:
            balanced.append(c._replace(worst=light[0], cuts=tuple(light[1])))
    assert balanced  # the fastest candidate always passes its own limit
    lightest = min(c.worst[0] for c in balanced)
    # per member, how many of the groups [0, g) have not met its data yet
    unmet = [list(itertools.accumulate(((p.agent, g) not in covered for g in range(n)), initial=0)) for p in members]

    def runs(c: _Candidate) -> list[tuple[int, int, int]]:  # (member, lo, hi) per hop
        return list(zip(c.order, (0, *c.cuts), (*c.cuts, n), strict=True))

    def fresh(c: _Candidate) -> int:  # (layer group, agent) pairs the sweep would meet for the first time
        return sum(unmet[i][hi] - unmet[i][lo] for i, lo, hi in runs(c))

    def sent(c: _Candidate) -> int:
        return copies.received([(members[i].agent, lo, hi) for i, lo, hi in runs(c)])

    # rotation only among assignments whose largest hop is within MEMORY_SLACK of the lightest possible;
    # then the fewest parameters on the wire, the lightest largest hop, the first order tried
    scored = [(fresh(c), c) for c in balanced if c.worst[0] <= lightest * MEMORY_SLACK + 1]
    if head_by:

        def head(c: _Candidate) -> float:
            return head_by.get(members[c.order[-1]].agent, math.inf)

        closest = min(head(c) for _, c in scored)
        scored = [(f, c) for f, c in scored if head(c) <= closest + HEAD_TOLERANCE]
    most = max(f for f, _ in scored)
    best = min((c for f, c in scored if f == most), key=lambda c: (sent(c), c.worst, c.k))
    return [members[i] for i in best.order], list(best.cuts)


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
    prox_mu: float = 0.0  # FedProx: weight of the proximal term toward the model the hop received (0 = off)
    lr_decay: float = 0.0  # the learning rate falls along a cosine over the rounds to lr * (1 - lr_decay)

    def lr_in(self, round_: int, rounds: int) -> float:
        """The learning rate of round ``round_`` of ``rounds``: ``lr`` with no decay; otherwise from ``lr`` in
        the first round along a half cosine to ``lr * (1 - lr_decay)`` in the last."""
        if self.lr_decay <= 0 or rounds <= 1:
            return self.lr
        progress = round_ / (rounds - 1)
        return self.lr * (1 - self.lr_decay * (1 - math.cos(math.pi * progress)) / 2)


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
    skew = plan.skew
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
        elif h.hop + 1 < len(plan.hops):
            holds = plan.held_by(h.hop + 1)
        else:  # P2P's last hop: the coordinator kept the initial model (LoRA: frozen tensors need not return)
            holds = plan.versions_after(-1)
        round_end = h.hop + 1 == len(plan.hops) or plan.hops[h.hop + 1].round != h.round
        task = HopTask(
            h.round, h.hop, h.segment, list(seg.groups), list(seg.tensors), sha, size, prev, nxt,
            settings.epochs, settings.batch_size, settings.lr_in(h.round, plan.rounds), settings.seed + h.hop,
            settings.max_steps,
            settings.checkpoints and round_end and plan.algorithm == "snake" and plan.mode == "p2p",
            skew.kd_alpha if skew else settings.kd_alpha, settings.kd_temperature, plan.algorithm == "split",
            settings.gradient_timeout_s, holds, skew.logit_adjust if skew else 0.0, skew.bn_mix if skew else 0.0,
            settings.prox_mu,
        )  # fmt: skip
        out.setdefault(h.agent, []).append(task)
    return out
