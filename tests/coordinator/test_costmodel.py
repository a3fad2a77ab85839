"""The planner's memory cost model against real training runs it was not fitted on.

``tools/bench_costmodel.py`` trains each case in a fresh torch-free process and reports the
trainer's share of peak RSS; the estimate must be within the stated tolerance
(``costmodel.TOLERANCE``, per backend). The coefficients were fitted on the benchmark's
default cases; these are other segments and batch sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import costmodel
from coordinator.plan import GroupInfo

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_memory_estimates_are_within_tolerance_on_unseen_segments(tmp_path: Path) -> None:
    out = tmp_path / "costmodel.json"
    cases = ["vgg11:features.4:features.5:24", "vgg11:features.1:features.3:40", "cnn:conv0:head:96"]
    command = [sys.executable, str(ROOT / "tools" / "bench_costmodel.py"), "--out", str(out)]
    for case in cases:
        command += ["--case", case]
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    report = json.loads(out.read_text())
    assert len(report["cases"]) == 2 * len(cases)  # both backends
    for case in report["cases"]:
        assert case["measured_mb"] > 0
        assert case["within_tolerance"], case


def groups() -> list[GroupInfo]:
    return [
        GroupInfo(f"g{i}", (f"g{i}.w",), (), p, 0, act, 10**6) for i, (p, act) in enumerate([(10, 4000), (10**6, 40)])
    ]


def test_a_front_segment_keeps_more_activations_and_a_large_one_more_state() -> None:
    gs = groups()
    front = costmodel.trainer_memory(gs, 0, 1, batch=64)
    back = costmodel.trainer_memory(gs, 1, 2, batch=64)
    whole = costmodel.trainer_memory(gs, 0, 2, batch=64)
    assert front.activations_mb > back.activations_mb and back.state_mb > front.state_mb
    assert whole.total_mb > max(front.total_mb, back.total_mb)
    assert front.weights_mb == back.weights_mb == whole.weights_mb  # every hop holds the whole model
    assert costmodel.trainer_memory(gs, 1, 2, 64, "sgd").state_mb < back.state_mb  # no moments
    with pytest.raises(ValueError, match="not within"):
        costmodel.trainer_memory(gs, 1, 1, 64)


def test_hop_time_grows_with_the_backward_depth_and_shrinks_with_speed() -> None:
    gs = groups()
    assert costmodel.hop_seconds(gs, 0, 1, 100, 10.0) > costmodel.hop_seconds(gs, 1, 2, 100, 10.0)
    fixed = costmodel.HOP_OVERHEAD_S
    assert costmodel.hop_seconds(gs, 0, 2, 100, 20.0) - fixed == pytest.approx(
        (costmodel.hop_seconds(gs, 0, 2, 100, 10.0) - fixed) / 2
    )
