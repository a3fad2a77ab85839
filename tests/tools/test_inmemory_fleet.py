"""A hundred agents and the coordinator in one process (``tools/inmemory.py``): the trial ends with every
agent trained once and the final model at the coordinator, and the control traffic per hop does not grow
with the fleet. ``tools/bench_control.py`` writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.events import HopFinished
from edge_agent.protocol.codec import decode_tensors
from tools import bench_control
from tools.inmemory import InMemoryTrial


def run(work: Path, size: int) -> tuple[InMemoryTrial, list[str]]:
    trained: list[str] = []
    trial = InMemoryTrial(work, size, "cnn", rounds=1, scale=0.001,
                          on_event=lambda e: trained.append(e.agent) if isinstance(e, HopFinished) else None)  # fmt: skip
    trial.run()
    return trial, trained


def test_a_hundred_agents_finish_a_round_with_traffic_linear_in_the_fleet(tmp_path: Path) -> None:
    per_hop = {}
    for size in (10, 100):
        trial, trained = run(tmp_path / str(size), size)
        assert trial.ctl.failed is None and trial.ctl.final_model is not None
        assert sorted(trained) == sorted(trial.services)  # each agent trained once
        assert set(decode_tensors(trial.ctl.final_model)) == set(trial.initial)
        assert trial.coordinator.byes_complete
        per_hop[size] = trial.traffic.messages["control"] / size
    assert per_hop[100] <= per_hop[10] * 1.1  # messages per hop: constant, not growing with the fleet


def test_the_benchmark_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench_control.main(["--agents", "12", "--out", str(out), "--repeats", "1", "--tensor-scale", "0.001"]) == 0
    report = json.loads(out.read_text())
    assert [(r["fleet"], r["agents"]) for r in report["planning"]] == [("alike", 10), ("alike", 12), ("mixed", 10),
                                                                        ("mixed", 12)]  # fmt: skip
    (trial,) = report["trials"]
    assert trial["agents"] == 12 and trial["hops"] == 12 and trial["phases_s"]["wall_s"] > 0
    assert trial["memory"]["coordinator_mb"] > 0 and trial["broker_messages"]["chunk"] > 0
