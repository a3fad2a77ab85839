"""Re-planning the rest of a Snake Learning trial when its fleet changes. Pure.

An agent that is lost mid-trial leaves hops nobody will train; one that comes back should get its
share again. The segments (and their built artifacts) stay as they are: only who trains each hop
from ``start`` on changes. A hop keeps the agent the original plan gave it when that agent is
available, else the one the current plan gives it; otherwise it goes to the available agent whose budget fits the segment and whose round is
least loaded (estimated seconds, the planner's cost model), preferring one other than the hop before
it so the model keeps travelling across data. Hops before ``start`` are history and never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from coordinator import costmodel
from coordinator.plan import AgentProfile, GroupInfo, Plan, PlanError, PlannedHop


def reroute(
    plan: Plan,
    original: Plan,
    start: int,
    fleet: Sequence[AgentProfile],
    groups: Sequence[GroupInfo],
    batch: int,
    optimizer: str = "adamw",
) -> Plan:
    """``plan`` with every hop from ``start`` on given to an agent of ``fleet`` (the available ones).

    Raises PlanError when a hop's segment fits none of them."""
    if plan.algorithm != "snake":
        raise PlanError(f"{plan.algorithm} trials cannot be re-routed; only snake trials survive a lost agent")
    if not fleet:
        raise PlanError("no agent is left to train the rest of the trial")
    profiles = {p.agent: p for p in fleet}
    index = {g.name: i for i, g in enumerate(groups)}
    hops = list(plan.hops[:start])
    load: dict[tuple[int, str], float] = {}
    for h in hops:
        load[h.round, h.agent] = load.get((h.round, h.agent), 0.0) + h.est_s
    for h in plan.hops[start:]:
        seg = plan.segments[h.segment]
        lo, hi = index[seg.groups[0]], index[seg.groups[-1]] + 1
        planned = original.hops[h.hop].agent if h.hop < len(original.hops) else h.agent
        candidates = [a for a in (planned, h.agent) if a in profiles][:1] or sorted(profiles)
        choice = _pick(
            candidates, profiles, load, h, hops[-1].agent if hops else None, groups, lo, hi, batch, optimizer
        )
        if choice is None:
            raise PlanError(
                f"no available agent can train segment {h.segment} ({', '.join(seg.groups)}) of hop {h.hop}"
            )
        agent, mb, seconds = choice
        load[h.round, agent] = load.get((h.round, agent), 0.0) + seconds
        hops.append(dataclasses.replace(h, agent=agent, est_mb=mb, est_s=seconds))
    return dataclasses.replace(plan, hops=tuple(hops))


def _pick(
    candidates: Sequence[str],
    profiles: Mapping[str, AgentProfile],
    load: Mapping[tuple[int, str], float],
    hop: PlannedHop,
    before: str | None,
    groups: Sequence[GroupInfo],
    lo: int,
    hi: int,
    batch: int,
    optimizer: str,
) -> tuple[str, float, float] | None:
    best: tuple[tuple[float, bool, str], tuple[str, float, float]] | None = None
    for agent in candidates:
        p = profiles[agent]
        mb = costmodel.hop_memory_mb(groups, lo, hi, batch, p.baseline_mb, optimizer, p.backend, p.data_mb)
        if p.budget_mb > 0 and mb > p.budget_mb:
            continue
        seconds = costmodel.hop_seconds(groups, lo, hi, max(p.samples, 1), p.gflops)
        key = (load.get((hop.round, agent), 0.0) + seconds, agent == before, agent)
        if best is None or key < best[0]:
            best = (key, (agent, mb, seconds))
    return best[1] if best else None
