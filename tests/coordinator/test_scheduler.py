"""Snake Learning and FedAvg plans: segments, route, rotation, budgets, balance. Pure functions, no I/O."""

from __future__ import annotations

import pytest

from coordinator import costmodel
from coordinator.plan import AgentProfile, GroupInfo, PlanError
from coordinator.scheduler import (  # noqa: PLC2701 (_sent_params: the planner's transfer count)
    MEMORY_STEP_MB,
    TIME_SLACK,
    HopSettings,
    _sent_params,
    fedavg_plan,
    hop_tasks,
    snake_plan,
    split_segments,
)
from edge_agent.protocol.topics import COORDINATOR


def groups(*sizes: int) -> list[GroupInfo]:
    return [GroupInfo(f"g{i}", (f"g{i}.w",), (f"g{i}.bn",), s) for i, s in enumerate(sizes)]


def test_segments_are_contiguous_cover_every_group_and_balance_parameters() -> None:
    segs = split_segments(groups(10, 100, 5, 50, 60), 3)
    assert [s.groups for s in segs] == [("g0",), ("g1", "g2"), ("g3", "g4")]
    assert max(s.num_params for s in segs) == 110  # the best achievable largest segment
    assert segs[1].tensors == ("g1.w", "g1.bn", "g2.w", "g2.bn") and segs[1].params == ("g1.w", "g2.w")


@pytest.mark.parametrize("parts", [0, 6])
def test_impossible_splits_are_refused(parts: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_segments(groups(1, 2, 3, 4, 5), parts)


@pytest.mark.parametrize(("agents", "rounds"), [(4, 4), (4, 2), (3, 5), (2, 1), (6, 3)])
def test_every_agent_trains_once_per_round_front_to_back(agents: int, rounds: int) -> None:
    ids = [f"a{i}" for i in range(agents)]
    plan = snake_plan(ids, groups(*[10] * 4), rounds)
    assert len(plan.hops) == agents * rounds
    for r in range(rounds):
        hops = [h for h in plan.hops if h.round == r]
        assert sorted(h.agent for h in hops) == ids
        # a round is one or more sweeps over the layers, input side first; it ends on the output side
        assert plan.segments[hops[-1].segment].groups[-1] == "g3"
        sweeps = -(-agents // 4)
        starts = [h for h in hops if plan.segments[h.segment].groups[0] == "g0"]
        assert len(starts) == sweeps


def test_segments_rotate_so_every_group_meets_every_agents_data() -> None:
    ids = ["a", "b", "c", "d"]
    plan = snake_plan(ids, groups(1, 2, 3, 4), rounds=4)
    assert all(agents == set(ids) for agents in plan.coverage().values())
    for agent in ids:
        assert sorted(g for h in plan.hops if h.agent == agent for g in plan.segments[h.segment].groups) == [
            "g0", "g1", "g2", "g3",
        ]  # fmt: skip


def test_fewer_agents_than_groups_balance_parameters_and_cover_every_group() -> None:
    plan = snake_plan(["a", "b"], groups(10, 100, 5, 50, 60), rounds=2)
    for r in range(2):
        params = [plan.segments[h.segment].num_params for h in plan.hops if h.round == r]
        assert sorted(params) == [110, 115]  # the best split of 225 into two contiguous runs
    assert all(agents == {"a", "b"} for agents in plan.coverage().values())


def test_more_agents_than_groups_take_turns_in_sweeps() -> None:
    plan = snake_plan([f"a{i}" for i in range(5)], groups(1, 1), rounds=2)
    for r in range(2):
        hops = [h for h in plan.hops if h.round == r]
        assert sorted(h.agent for h in hops) == [f"a{i}" for i in range(5)]
        trained = [g for h in hops for g in plan.segments[h.segment].groups]
        assert trained.count("g0") == trained.count("g1") == 3  # three sweeps (2 + 2 + 1 agents) over both groups


def vgg_like() -> list[GroupInfo]:
    """A front-heavy-in-activations, back-heavy-in-parameters model (shaped like VGG on 28x28)."""
    spec = [(1_000, 500_000, 10**9), (300_000, 120_000, 10**9), (2_000_000, 40_000, 10**8), (3_000_000, 8_000, 10**7)]
    return [GroupInfo(f"g{i}", (f"g{i}.w",), (), p, 0, act, fl) for i, (p, act, fl) in enumerate(spec)]


def test_a_tight_memory_budget_gets_segments_that_fit_and_fedavg_leaves_it_out_with_a_reason() -> None:
    gs = vgg_like()
    free = [AgentProfile(f"a{i}", 0, 100, 50, "ort", 1000) for i in range(3)]
    whole = costmodel.hop_memory_mb(gs, 0, 4, 64, 100)
    back = costmodel.hop_memory_mb(gs, 3, 4, 64, 100)
    assert back < whole
    capped = AgentProfile("capped", (back + whole) / 2, 100, 50, "ort", 1000)
    plan = snake_plan([*free, capped], gs, rounds=4, batch=64)
    assert not plan.excluded
    mine = [h for h in plan.hops if h.agent == "capped"]
    assert len(mine) == 4 and all(h.est_mb <= capped.budget_mb for h in mine)
    fed = fedavg_plan([*free, capped], gs, rounds=2, batch=64)
    assert [a for a, _ in fed.excluded] == ["capped"]
    assert "unable to train" in fed.excluded[0][1] and f"{capped.budget_mb:.0f} MiB" in fed.excluded[0][1]
    assert {h.agent for h in fed.hops} == {"a0", "a1", "a2"}


def test_an_agent_that_fits_no_group_is_left_out_and_an_impossible_fleet_is_refused() -> None:
    gs = vgg_like()
    tiny = AgentProfile("tiny", 50, 100, 50, "ort", 1000)  # below its own idle footprint
    plan = snake_plan([AgentProfile("a", 0, 100, 50), tiny], gs, rounds=2)
    assert plan.excluded and plan.excluded[0][0] == "tiny" and "budget is 50 MiB" in plan.excluded[0][1]
    assert {h.agent for h in plan.hops} == {"a"}
    with pytest.raises(PlanError, match="no agent can train"):
        snake_plan([tiny], gs, rounds=1)
    with pytest.raises(PlanError, match="no agent can train the whole model"):
        fedavg_plan([tiny], gs, rounds=1)


def test_a_slow_agent_gets_a_lighter_segment() -> None:
    gs = groups(10, 10, 10, 10, 10, 10, 10, 10)
    fleet = [AgentProfile("fast", gflops=40.0), AgentProfile("slow", gflops=10.0)]
    plan = snake_plan(fleet, gs, rounds=2)
    for r in range(2):
        params = {h.agent: plan.segments[h.segment].num_params for h in plan.hops if h.round == r}
        assert params["slow"] < params["fast"]


def test_plans_print_and_serialise_their_estimates() -> None:
    fleet = [AgentProfile(f"a{i}", 0, 100, 50, "ort", 1000) for i in range(2)]
    plan = snake_plan(fleet, vgg_like(), rounds=1)
    text = "\n".join(plan.describe())
    assert "MiB" in text and " s]" in text
    data = plan.as_dict()
    assert {"segments", "hops", "excluded", "coverage"} <= set(data) and data["hops"][0]["est_mb"] > 100


def test_the_learning_rate_decays_over_the_rounds_only_when_asked() -> None:
    arts = {(0, "ort"): ("sha0", 1), (1, "ort"): ("sha1", 1)}
    plan = snake_plan(["a", "b"], groups(1, 1), 5, "p2p")

    def rates(settings: HopSettings) -> list[float]:
        tasks = sorted((t for ts in hop_tasks(plan, arts, settings).values() for t in ts), key=lambda t: t.hop)
        assert all(t.lr == tasks[2 * t.round].lr for t in tasks)  # one rate per round
        return [tasks[2 * r].lr for r in range(5)]

    assert rates(HopSettings(1, 32, 0.1, 7, None)) == [0.1] * 5  # the default: constant
    decayed = rates(HopSettings(1, 32, 0.1, 7, None, lr_decay=0.9))
    assert decayed[0] == 0.1 and decayed[-1] == pytest.approx(0.01) and decayed[2] == pytest.approx(0.055)
    assert all(a > b for a, b in zip(decayed, decayed[1:], strict=False))


def test_p2p_chains_agents_and_cs_routes_every_hop_through_the_coordinator() -> None:
    arts = {(0, "ort"): ("sha0", 1), (1, "ort"): ("sha1", 1), (0, "portable"): ("p0", 1), (1, "portable"): ("p1", 1)}
    settings = HopSettings(1, 32, 0.1, 7, None)
    plan = snake_plan(["a", "b"], groups(1, 1), 2, "p2p")
    p2p = hop_tasks(plan, arts, settings)
    route = [h.agent for h in plan.hops]
    assert route == ["a", "b", "b", "a"]  # round 1 swaps the layers: b trains g0, a trains g1
    by_hop = {t.hop: t for ts in p2p.values() for t in ts}
    assert [(by_hop[i].prev, by_hop[i].next) for i in range(4)] == [
        (COORDINATOR, "b"), ("a", "b"), ("b", "a"), ("b", COORDINATOR),
    ]  # fmt: skip
    cs = hop_tasks(snake_plan(["a", "b"], groups(1, 1), 2, "cs"), arts, settings)
    assert all(t.prev == t.next == COORDINATOR for ts in cs.values() for t in ts)
    assert [t.seed for t in p2p["a"]] == [7, 10]  # a distinct shuffling seed per hop (seed + hop)
    mixed = hop_tasks(snake_plan(["a", "b"], groups(1, 1), 1), arts, settings, {"a": "ort", "b": "portable"})
    assert [t.artifact_sha256 for t in mixed["a"] + mixed["b"]] == [
        "sha0",
        "p1",
    ]  # each agent gets its backend's bundle


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"agents": []}, "at least one agent"), ({"rounds": 0}, "at least one round"), ({"mode": "ring"}, "unknown mode")],
)
def test_bad_plan_requests_say_why(kwargs: dict, message: str) -> None:
    args = {"agents": ["a"], "groups": groups(1), "rounds": 1, "mode": "p2p"} | kwargs
    with pytest.raises(ValueError, match=message):
        snake_plan(**args)


def test_kd_settings_reach_every_hop_task_and_old_tasks_still_parse() -> None:
    from edge_agent.protocol.messages import HopTask, body_of, to_body

    arts = {(0, "ort"): ("sha0", 1), (1, "ort"): ("sha1", 1)}
    settings = HopSettings(1, 32, 0.1, 7, None, kd_alpha=0.5, kd_temperature=3.0)
    tasks = hop_tasks(snake_plan(["a", "b"], groups(1, 1), 1), arts, settings)
    assert {(t.kd_alpha, t.kd_temperature) for ts in tasks.values() for t in ts} == {(0.5, 3.0)}
    body = to_body(tasks["a"][0])
    assert body_of(HopTask, body) == tasks["a"][0]
    old = {k: v for k, v in body.items() if not k.startswith("kd_")}  # a task from before KD existed
    assert (body_of(HopTask, old).kd_alpha, body_of(HopTask, old).kd_temperature) == (0.0, 2.0)


def test_calibration_noise_does_not_cost_rotation_but_a_truly_slow_agent_is_seen() -> None:
    noisy = [AgentProfile(f"a{i}", gflops=g) for i, g in enumerate([10.4, 13.7, 15.0, 13.4])]
    plan = snake_plan(noisy, vgg_like(), rounds=4)
    assert all(len(agents) == 4 for agents in plan.coverage().values())  # every group meets every agent
    slow = [AgentProfile("fast", gflops=50.0), AgentProfile("slow", gflops=12.0)]
    plan = snake_plan(slow, groups(10, 10, 10, 10, 10, 10, 10, 10), rounds=1)
    params = {h.agent: plan.segments[h.segment].num_params for h in plan.hops}
    assert params["slow"] < params["fast"]


def test_alike_agents_plan_alike_whatever_footprints_they_measure_but_a_heavier_agent_is_seen() -> None:
    from tests.coordinator.test_plan_golden import layout  # the real cnn's layer groups

    def route(footprints: list[float]) -> list[str]:
        fleet = [AgentProfile(f"agent-{i}", 24105.0, mb, 80.0, "ort", 3000) for i, mb in enumerate(footprints)]
        return [h.agent for h in snake_plan(fleet, layout("cnn"), rounds=4).hops]

    same = route([105.0] * 4)
    # footprints a simulated fleet of identical agents reported; taken literally they gave another route
    assert route([104.1, 110.0, 105.3, 106.9]) == route([109.2, 103.0, 107.7, 105.1]) == same
    fleet = [AgentProfile(f"a{i}", 200.0, mb, 80.0, "ort", 3000) for i, mb in enumerate([100.0, 104.0, 150.0])]
    estimates = {h.agent: h.est_mb for h in snake_plan(fleet, layout("cnn"), rounds=1).hops}
    # the two alike count as the larger of them (never less memory than measured); the heavy one keeps its own
    assert estimates["a0"] >= 104.0 and estimates["a2"] >= 150.0
    assert max(estimates.values()) <= 200.0  # and every hop still fits its budget


def test_among_equally_fast_cuts_the_plan_takes_the_one_with_the_smallest_largest_hop() -> None:
    # the front keeps every later activation, the back holds most parameters; equal compute per group
    spec = [(1_000, 500_000), (300_000, 300_000), (1_000_000, 100_000), (3_000_000, 8_000)]
    gs = [GroupInfo(f"g{i}", (f"g{i}.w",), (), p, 0, act, 10**8) for i, (p, act) in enumerate(spec)]
    fleet = [AgentProfile(f"a{i}", 0, 100, 50, "ort", 1000) for i in range(2)]
    plan = snake_plan(fleet, gs, rounds=1, batch=64)

    def worst(cut: int) -> tuple[float, float]:  # (largest hop's MiB, slowest hop's seconds)
        runs = ((0, cut), (cut, len(gs)))
        mib = max(costmodel.hop_memory_mb(gs, lo, hi, 64, 100) for lo, hi in runs)
        return mib, max(costmodel.hop_seconds(gs, lo, hi, 1000, 50) for lo, hi in runs)

    fastest = min(worst(c)[1] for c in range(1, len(gs)))
    allowed = [worst(c)[0] for c in range(1, len(gs)) if worst(c)[1] <= fastest * TIME_SLACK]
    assert max(h.est_mb for h in plan.hops) <= min(allowed) + MEMORY_STEP_MB / 2
    # the parameter-balanced cut (g0..g2 | g3) is as fast, but its front hop needs more memory
    assert split_segments(gs, 2)[0].groups == ("g0", "g1", "g2")
    assert max(h.est_mb for h in plan.hops) < worst(3)[0] - MEMORY_STEP_MB


def test_a_hop_receives_only_what_changed_since_its_agent_last_handed_the_model_on() -> None:
    gs = groups(1, 10, 100, 1000)
    shift = [("a", 0, 1), ("b", 1, 2), ("c", 2, 3), ("d", 3, 4), ("b", 0, 1), ("c", 1, 2), ("d", 2, 3), ("a", 3, 4)]
    # round 0: nobody holds a copy; round 1: b lacks g2 g3, c lacks g0 g3, d lacks g0 g1, a lacks all
    assert _sent_params(shift, 0, gs) == 4 * 1111 + 1100 + 1001 + 11 + 1111
    # the same segments, another order in round 1: b's copy is older, so more travels
    other = [*shift[:4], ("c", 0, 1), ("b", 1, 2), ("a", 2, 3), ("d", 3, 4)]
    assert _sent_params(other, 4, gs) > _sent_params(shift, 4, gs)
    plan = snake_plan([AgentProfile(x, gflops=(50.0, 95.0)[i % 2]) for i, x in enumerate("abcd")], gs, rounds=2)
    names = [g.name for g in gs]
    hops = [
        (h.agent, names.index(plan.segments[h.segment].groups[0]), names.index(plan.segments[h.segment].groups[-1]) + 1)
        for h in plan.hops
    ]
    assert _sent_params(hops, 4, gs) == _sent_params(shift, 4, gs)  # speeds within 2x: the cheapest rotation
