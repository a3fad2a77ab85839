"""Label skew on the coordinator: the measure, the decision per setting, and the plan carrying it to every hop."""

from __future__ import annotations

import dataclasses

from coordinator.config import TrainConfig
from coordinator.plan import GroupInfo
from coordinator.scheduler import HEAD_TOLERANCE, HopSettings, hop_tasks, snake_plan
from coordinator.skew import SKEWED_AT, decide, distances, label_mix, label_skew

IID = {"a": [100, 100, 100], "b": [98, 102, 100]}
SKEWED = {"a": [300, 0, 0], "b": [0, 150, 150]}


def test_skew_is_small_for_iid_and_large_for_disjoint_labels() -> None:
    assert label_skew(IID) < 0.01
    assert label_skew(SKEWED) > 0.4  # half of each agent's mix differs from the pooled one
    assert label_skew({}) == 0.0
    assert label_mix([0, 30, 10]) == "1:75% 2:25%"


def test_auto_switches_the_methods_on_only_under_skew() -> None:
    train = TrainConfig()
    assert not decide(train, IID).active and decide(train, IID).logit_adjust == 0
    on = decide(train, SKEWED)
    assert on.active and on.kd_alpha == train.skew_kd_alpha and on.logit_adjust == train.logit_adjust
    assert not decide(dataclasses.replace(train, label_skew="off"), SKEWED).active
    assert decide(dataclasses.replace(train, label_skew="on"), IID).active
    assert decide(dataclasses.replace(train, kd_alpha=1.5), SKEWED).kd_alpha == 1.5  # an explicit kd_alpha wins
    assert f"{SKEWED_AT:g}" in on.describe() and "logit adjustment" in on.describe()


def test_the_plan_carries_the_methods_to_every_hop_task() -> None:
    groups = [GroupInfo(f"g{i}", (f"g{i}.w",), (), 10) for i in range(2)]
    plan = dataclasses.replace(snake_plan(["a", "b"], groups, 2), skew=decide(TrainConfig(), SKEWED))
    artifacts = {(s.index, "ort"): ("0" * 64, 1) for s in plan.segments}
    tasks = [t for ts in hop_tasks(plan, artifacts, HopSettings(1, 8, 0.1, 0, None)).values() for t in ts]
    assert {(t.kd_alpha, t.logit_adjust) for t in tasks} == {(4.0, 1.0)}
    assert any("label skew" in line for line in plan.describe())
    assert plan.as_dict()["label_skew"]["active"] is True
    plain = [
        t
        for ts in hop_tasks(snake_plan(["a", "b"], groups, 2), artifacts, HopSettings(1, 8, 0.1, 0, None)).values()
        for t in ts
    ]
    assert {(t.kd_alpha, t.logit_adjust, t.bn_mix) for t in plain} == {(0.0, 0.0, 0.0)}


def test_fedprox_plans_like_fedavg_and_its_hops_carry_mu() -> None:
    from coordinator.config import TrialConfig
    from coordinator.prepare import make_plan
    from coordinator.scheduler import fedavg_plan

    groups = [GroupInfo(f"g{i}", (f"g{i}.w",), (), 10) for i in range(2)]
    config = TrialConfig(algorithm="fedprox", agents=2).validate()
    assert make_plan(config, groups, ["a", "b"], SKEWED) == fedavg_plan(["a", "b"], groups, config.rounds)
    plan = fedavg_plan(["a", "b"], groups, 1)
    settings = HopSettings(1, 8, 0.1, 0, None, prox_mu=config.train.prox_mu)
    tasks = [t for ts in hop_tasks(plan, {(0, "ort"): ("0" * 64, 1)}, settings).values() for t in ts]
    assert {(t.prox_mu, t.logit_adjust, t.kd_alpha) for t in tasks} == {(0.01, 0.0, 0.0)}


# Four agents with the same data volume: "d" holds every class evenly, the others one class each.
MIXED = {"a": [400, 0, 0, 0], "b": [0, 400, 0, 0], "c": [0, 0, 400, 0], "d": [100, 100, 100, 100]}


def test_distances_measure_each_agent_against_the_fleets_mix() -> None:
    d = distances(MIXED)
    assert d["d"] < 0.2 < min(d["a"], d["b"], d["c"])
    assert distances({}) == {} and distances({"a": [1, 2], "b": [1, 2, 3]}) == {}  # nothing comparable
    assert label_skew(MIXED) == sum(d.values()) / 4  # equal volumes: the plain mean


def test_the_last_hop_goes_to_the_agent_closest_to_the_fleets_label_mix() -> None:
    groups = [GroupInfo(f"g{i}", (f"g{i}.w",), (), 10) for i in range(4)]
    rotated = snake_plan(list(MIXED), groups, 3)
    assert rotated.hops[-1].agent != "d"  # without labels, rotation gives the last hop to another agent
    plan = snake_plan(list(MIXED), groups, 3, head_by=distances(MIXED))
    assert plan.hops[-1].agent == "d"
    assert plan.hops[:8] == rotated.hops[:8]  # only the last round is planned differently
    assert sorted(h.agent for h in plan.hops[8:]) == sorted(MIXED)  # every agent still trains once in it
    # distances within HEAD_TOLERANCE of the closest are sampling noise: the plan stays the rotation's
    near = {a: 0.40 + (HEAD_TOLERANCE / 2 if a == rotated.hops[-1].agent else 0.0) for a in MIXED}
    assert snake_plan(list(MIXED), groups, 3, head_by=near) == rotated


def test_make_plan_balances_the_head_only_under_skew_and_says_why() -> None:
    from coordinator.config import TrialConfig
    from coordinator.prepare import make_plan

    groups = [GroupInfo(f"g{i}", (f"g{i}.w",), (), 10) for i in range(4)]
    config = TrialConfig(agents=4, rounds=3, train=TrainConfig(balanced_head=True)).validate()
    plan = make_plan(config, groups, list(MIXED), MIXED)
    assert plan.hops[-1].agent == "d" and plan.skew is not None and plan.skew.active
    assert any("last hop" in n and "goes to d" in n for n in plan.describe())
    rotated = snake_plan(list(MIXED), groups, 3)
    for train in (TrainConfig(), TrainConfig(balanced_head=True, label_skew="off")):  # off by default
        other = make_plan(dataclasses.replace(config, train=train), groups, list(MIXED), MIXED)
        assert other.hops == rotated.hops and not any("last hop" in n for n in other.notes)
    balanced = {a: [100, 100, 100, 100] for a in MIXED}  # IID: no methods, no preference
    assert make_plan(config, groups, list(MIXED), balanced).hops == rotated.hops
