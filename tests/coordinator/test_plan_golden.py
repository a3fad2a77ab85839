"""Plans for small and medium fleets, pinned: ``golden/plans.json`` holds ~150 fleets (1-12 agents and a
few of 16-40; budgets from unlimited to barely fitting, speeds from unknown to 25x apart, both backends,
real mlp/cnn/vgg11 layer groups and synthetic ones) with the plan the planner gave each before it was made
to scale to 1,000 agents. A faster planner must give the same plans, estimates and refusals.

Regenerate (only when a plan is meant to change, and say why in the commit):
``python -m tests.coordinator.test_plan_golden --write``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator import costmodel
from coordinator.plan import AgentProfile, GroupInfo, Plan, PlanError
from coordinator.scheduler import snake_plan

GOLDEN = Path(__file__).parent / "golden"
LAYOUTS: dict[str, list[list[Any]]] = json.loads((GOLDEN / "layouts.json").read_text())
SYNTHETIC = {  # name -> (parameters, activation bytes, flops) per group
    "flat4": [(10, 0, 0)] * 4,
    "skew5": [(10, 0, 0), (100, 0, 0), (5, 0, 0), (50, 0, 0), (60, 0, 0)],
    "flat8": [(10, 0, 0)] * 8,
    "vgg_like": [
        (1_000, 500_000, 10**9),
        (300_000, 120_000, 10**9),
        (2_000_000, 40_000, 10**8),
        (3_000_000, 8_000, 10**7),
    ],
}


def layout(name: str) -> list[GroupInfo]:
    """Layer groups: a real model's (``golden/layouts.json``: name, parameters, buffer floats, activation
    bytes and flops per sample, as ``coordinator.costs`` measured them) or a synthetic one."""
    if name in LAYOUTS:
        return [
            GroupInfo(g, (f"{g}.weight",), (f"{g}.stat",) if buf else (), p, buf, act, fl)
            for g, p, buf, act, fl in LAYOUTS[name]
        ]
    return [GroupInfo(f"g{i}", (f"g{i}.w",), (), p, 0, act, fl) for i, (p, act, fl) in enumerate(SYNTHETIC[name])]


def fleet_of(case: dict[str, Any]) -> list[str | AgentProfile]:
    return [a if isinstance(a, str) else AgentProfile(*a) for a in case["fleet"]]


def outcome(case: dict[str, Any]) -> dict[str, Any]:
    """What the planner makes of a case: the plan (segments, hops with estimates, who is left out) or its refusal."""
    try:
        plan = snake_plan(fleet_of(case), layout(case["layout"]), case["rounds"], case["mode"], case["batch"],
                          case["optimizer"])  # fmt: skip
    except PlanError as exc:
        return {"error": str(exc)}
    return summary(plan)


def summary(plan: Plan) -> dict[str, Any]:
    return {
        "segments": [list(s.groups) for s in plan.segments],
        "hops": [[h.round, h.agent, h.segment, h.est_mb, h.est_s] for h in plan.hops],
        "excluded": [list(e) for e in plan.excluded],
    }


def _profile(rng: random.Random, name: str, groups: list[GroupInfo], batch: int, optimizer: str) -> list[Any]:
    backend = rng.choice(["ort", "ort", "portable"])
    baseline = rng.choice([0.0, 78.0, 100.0])
    gflops = rng.choice([None, 100.0 * rng.uniform(0.8, 1.25), 100.0 * rng.uniform(0.8, 1.25), 30.0, 12.0, 300.0])
    samples = rng.choice([0, 100, 1000, 6000])
    data_mb = rng.choice([0.0, 0.0, round(rng.uniform(1, 10), 1)])
    budget = 0.0
    if rng.random() < 0.5:  # from below the lightest hop (left out) to above the whole model
        n = len(groups)
        light = min(
            costmodel.hop_memory_mb(groups, g, g + 1, batch, baseline, optimizer, backend, data_mb) for g in range(n)
        )
        whole = costmodel.hop_memory_mb(groups, 0, n, batch, baseline, optimizer, backend, data_mb)
        budget = round(rng.uniform(light * 0.97, whole * 1.05), 1)
    return [name, budget, baseline, gflops, backend, samples, data_mb]


def cases(seed: int = 10) -> list[dict[str, Any]]:
    """The pinned fleets (deterministic in ``seed``)."""
    rng = random.Random(seed)
    out = []
    sizes = [n for n in range(1, 13) for _ in range(11)] + [16, 16, 24, 24, 40, 40]
    for i, size in enumerate(sizes):
        name = rng.choice([*LAYOUTS, *SYNTHETIC])
        batch, optimizer = rng.choice([16, 64, 128]), rng.choice(["adamw", "adamw", "sgd"])
        groups = layout(name)
        names = [f"{rng.choice('abcdxyz')}{k}" for k in rng.sample(range(100), size)]
        kind = ("names", "same", "mixed", "mixed")[i % 4]
        if kind == "names":
            fleet: list[Any] = names
        elif kind == "same":
            one = _profile(rng, "", groups, batch, optimizer)
            fleet = [[a, *one[1:]] for a in names]
        else:
            fleet = [_profile(rng, a, groups, batch, optimizer) for a in names]
        rounds, mode = rng.choice([1, 2, 3, 4, 5]), rng.choice(["p2p", "cs"])
        out.append({"layout": name, "rounds": rounds, "mode": mode, "batch": batch, "optimizer": optimizer,
                    "fleet": fleet})  # fmt: skip
    return out


def _load() -> list[dict[str, Any]]:
    path = GOLDEN / "plans.json"
    return json.loads(path.read_text()) if path.exists() else []  # missing: the test below says so


def test_the_pinned_cases_are_the_generated_ones() -> None:
    assert [c["case"] for c in _load()] == json.loads(json.dumps(cases()))


@pytest.mark.parametrize("entry", _load(), ids=lambda e: f"{len(e['case']['fleet'])}x{e['case']['layout']}")
def test_small_and_medium_fleets_get_the_pinned_plans(entry: dict[str, Any]) -> None:
    assert json.loads(json.dumps(outcome(entry["case"]))) == entry["plan"]


def write() -> None:
    entries = [{"case": c, "plan": outcome(c)} for c in cases()]
    (GOLDEN / "plans.json").write_text(
        "[\n" + ",\n".join(json.dumps(e, separators=(",", ":")) for e in entries) + "\n]\n"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.coordinator.test_plan_golden --write")
    write()
