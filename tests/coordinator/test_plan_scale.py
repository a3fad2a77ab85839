"""A 1,000-agent fleet gets a valid plan (no timing assertions: ``tools/bench_control.py`` measures), and
the per-hop views of a plan a trial asks for (versions, what a receiver holds) agree with their definition."""

from __future__ import annotations

import random

from coordinator.plan import AgentProfile, Plan
from coordinator.scheduler import HopSettings, hop_tasks, snake_plan
from edge_agent.protocol.delta import INITIAL
from tests.coordinator.test_plan_golden import layout


def fleet(size: int, seed: int = 3) -> list[AgentProfile]:
    """Boards of a few kinds (budgets, speeds, backends), some too small for any layer group."""
    rng = random.Random(seed)
    return [
        AgentProfile(
            f"agent-{i}",
            rng.choice([0.0, 300.0, 512.0, 1024.0, 100.0]),
            rng.choice([78.0, 77.0]),
            rng.choice([12.0, 30.0, 100.0, 300.0, None]),
            rng.choice(["ort", "portable"]),
            54,
        )  # fmt: skip
        for i in range(size)
    ]


def test_a_thousand_agents_get_a_valid_plan() -> None:
    groups = layout("cnn")
    agents = fleet(1000)
    plan = snake_plan(agents, groups, rounds=2)
    left_out = {a for a, _ in plan.excluded}
    assert left_out and all("budget is 100 MiB" in r for _, r in plan.excluded)  # the 100 MiB boards
    planned = [p for p in agents if p.agent not in left_out]
    budget = {p.agent: p.budget_mb for p in planned}
    names = [g.name for g in groups]
    for r in range(2):
        hops = [h for h in plan.hops if h.round == r]
        assert sorted(h.agent for h in hops) == sorted(budget)  # everyone who fits trains once per round
        runs = [plan.segments[h.segment].groups for h in hops]
        flat = [g for run in runs for g in run]  # sweeps: each covers the layers once, input side first
        sweeps = [flat[i : i + len(names)] for i in range(0, len(flat), len(names))]
        assert all(s == names for s in sweeps) and len(sweeps) == -(-len(hops) // len(names))
    assert all(budget[h.agent] <= 0 or h.est_mb <= budget[h.agent] for h in plan.hops)
    assert plan.hops[-1].round == 1 and plan.segments[plan.hops[-1].segment].groups[-1] == names[-1]


def test_a_thousand_alike_agents_rotate_so_every_group_meets_every_agents_data() -> None:
    agents = [AgentProfile(f"agent-{i}", 0.0, 78.0, 100.0, "ort", 54) for i in range(1000)]  # `plan --agents 1000`
    plan = snake_plan(agents, layout("cnn"), rounds=4)
    assert len(plan.hops) == 4000 and all(len(met) == 1000 for met in plan.coverage().values())


def _versions_after(plan: Plan, hop: int) -> dict[str, int]:  # the definition, replayed from the start
    versions = {g: INITIAL for g, _ in plan.layout}
    for h in plan.hops[: hop + 1]:
        versions.update({g: h.hop for g in plan.segments[h.segment].groups})
    return versions


def test_per_hop_versions_and_held_copies_agree_with_their_definition() -> None:
    plan = snake_plan(fleet(40, seed=5), layout("vgg11"), rounds=3)
    for hop in range(-1, len(plan.hops) + 1):
        assert plan.versions_after(hop) == _versions_after(plan, hop)
    for h in plan.hops:
        before = [e.hop for e in plan.hops[: h.hop] if e.agent == h.agent]
        assert plan.held_by(h.hop) == (_versions_after(plan, before[-1]) if before else {})
    arts = {(s.index, k): ("sha", 1) for s in plan.segments for k in ("ort", "portable")}
    tasks = hop_tasks(plan, arts, HopSettings(1, 32, 0.1, 0, None))
    assert sum(len(t) for t in tasks.values()) == len(plan.hops)
