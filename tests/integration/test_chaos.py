"""tools/chaos.py on a small trial: agents, the coordinator and the broker killed and restarted at seeded
times during a real trial (mosquitto, agent and coordinator processes); the trial completes and no hop that
was reported done is trained again. Also the schedule's promises, which need no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.chaos import BUSY, KINDS, ChaosOptions, chaos, plan_faults
from tools.chaos_report import lost_completed_hops


@pytest.mark.parametrize("seed", range(20))
def test_a_schedule_has_each_kind_of_fault_spread_over_the_span(seed: int) -> None:
    faults = plan_faults(seed, 20.0, ["agent-0", "agent-1", "agent-2"])
    assert faults == plan_faults(seed, 20.0, ["agent-0", "agent-1", "agent-2"])  # seeded
    assert 3 <= len(faults) <= 6 and {f.kind for f in faults} == set(KINDS)
    times = [f.at_s for f in faults]
    assert times == sorted(times) and all(b - a > 0.5 for a, b in zip(times, times[1:], strict=False))
    assert 2.0 <= times[0] and times[-1] <= 15.0
    assert all(f.target in {"agent-0", "agent-1", "agent-2", BUSY} for f in faults if f.kind == "agent")


def test_completed_hops_lost_counts_every_finish_after_the_first() -> None:
    assert lost_completed_hops([0, 1, 2, 3]) == 0
    assert lost_completed_hops([0, 1, 2, 1, 2, 3]) == 2


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.ort
@pytest.mark.torch
@pytest.mark.timeout(300)
@pytest.mark.expect_errors  # a killed broker or agent may leave ERROR lines behind (reported in chaos.json)
def test_a_trial_survives_seeded_chaos_and_loses_no_completed_hop(tmp_path: Path) -> None:
    report = chaos(ChaosOptions(seed=1, out=tmp_path / "chaos", rounds=3, samples=1200, epochs=3, faults=3))
    assert report["completed"], report["chaos"]
    assert report["faults_injected"] >= 2 and report["faults_survived"] == report["faults_injected"]
    assert report["completed_hops_lost"] == 0 and report["summary_hops_lost"] == 0
    # a hop whose report died with the broker's queue counts as finished once a later hop reports
    assert report["chaos"]["hops"] + len(report["chaos"]["hops_unreported"]) == 9
    assert report["chaos"]["resumed"] is True
    assert report["accuracy"]["chaos"] > 0.5
