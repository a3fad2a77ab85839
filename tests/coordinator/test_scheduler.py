"""The default Snake Learning plan: segments, route, rotation. Pure functions, no I/O."""

from __future__ import annotations

import pytest

from coordinator.scheduler import GroupInfo, HopSettings, hop_tasks, snake_plan, split_segments
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
def test_every_agent_trains_once_per_round_and_the_last_hop_trains_the_output_side(agents: int, rounds: int) -> None:
    ids = [f"a{i}" for i in range(agents)]
    plan = snake_plan(ids, groups(*[10] * 4), rounds)
    assert len(plan.hops) == agents * rounds
    for r in range(rounds):
        assert [h.agent for h in plan.hops if h.round == r] == ids
    assert plan.hops[-1].segment == len(plan.segments) - 1


def test_segments_rotate_so_every_group_meets_every_agents_data() -> None:
    ids = ["a", "b", "c", "d"]
    plan = snake_plan(ids, groups(1, 2, 3, 4), rounds=4)
    for agent in ids:
        assert sorted(h.segment for h in plan.hops if h.agent == agent) == [0, 1, 2, 3]


def test_more_agents_than_groups_share_segments() -> None:
    plan = snake_plan([f"a{i}" for i in range(5)], groups(1, 1), rounds=1)
    assert len(plan.segments) == 2 and len(plan.hops) == 5


def test_p2p_chains_agents_and_cs_routes_every_hop_through_the_coordinator() -> None:
    arts = {(0, "ort"): ("sha0", 1), (1, "ort"): ("sha1", 1), (0, "portable"): ("p0", 1), (1, "portable"): ("p1", 1)}
    settings = HopSettings(1, 32, 0.1, 7, None)
    p2p = hop_tasks(snake_plan(["a", "b"], groups(1, 1), 2, "p2p"), arts, settings)
    assert [(t.prev, t.next) for t in p2p["a"]] == [(COORDINATOR, "b"), ("b", "b")]
    assert [(t.prev, t.next) for t in p2p["b"]] == [("a", "a"), ("a", COORDINATOR)]
    cs = hop_tasks(snake_plan(["a", "b"], groups(1, 1), 2, "cs"), arts, settings)
    assert all(t.prev == t.next == COORDINATOR for ts in cs.values() for t in ts)
    assert [t.seed for t in p2p["a"]] == [7, 9]  # a distinct shuffling seed per hop
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
