"""The comparison report from trial summaries: targets, ratios, files a person can read."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.report import reach, write_report


def summary(algorithm: str, partition: str, accs: list[float], mb: float, rss: float) -> dict:
    rounds = [
        {"round": i, "test_accuracy": a, "test_loss": 1 - a, "bytes": int((i + 1) * mb * 1e6)}
        for i, a in enumerate(accs)
    ]
    agents = [
        {"agent_id": f"a{i}", "peak_rss_mb": rss + i, "max_trainable_params": 10, "bytes_sent": 1} for i in range(2)
    ]
    return {"algorithm": algorithm, "partition": partition, "final_test_accuracy": accs[-1], "round_test": rounds,
            "bytes_total": int(len(accs) * mb * 1e6), "agents": agents, "wall_s": 3.0}  # fmt: skip


def test_rounds_and_bytes_to_target() -> None:
    s = summary("snake", "iid", [0.5, 0.82, 0.9], 2.0, 100)
    assert reach(s, 0.8) == (2, 4_000_000)
    assert reach(s, 0.95) == (None, None)


def test_report_files_and_snake_over_fedavg_ratios(tmp_path: Path) -> None:
    runs = [summary("snake", "iid", [0.7, 0.85], 1.0, 300), summary("fedavg", "iid", [0.75, 0.86], 4.0, 600),
            {"algorithm": "snake", "partition": "dirichlet:0.1", "failed": "agent-1 exited with code 4"}]  # fmt: skip
    result = write_report(runs, tmp_path, 0.8, "title")
    (ratio,) = result["ratios"]
    assert ratio["partition"] == "iid"
    assert ratio["snake_over_fedavg_bytes"] == 0.25 and ratio["snake_over_fedavg_peak_rss"] == round(301 / 601, 3)
    assert ratio["accuracy_gap_points"] == -1.0
    report = (tmp_path / "report.md").read_text()
    assert "| snake / iid | 0.8500 | 2 | 2.0 | 2.0 |" in report and "failed: agent-1 exited" in report
    assert json.loads((tmp_path / "compare.json").read_text())["target_accuracy"] == 0.8
    for png in ("accuracy_rounds.png", "accuracy_bytes.png", "peak_memory.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_variants_get_their_own_rows_and_ratios_against_plain_snake(tmp_path: Path) -> None:
    runs = [
        {**summary("snake", "dirichlet:0.1", [0.3, 0.4], 1.0, 300), "variant": "snake"},
        {**summary("snake", "dirichlet:0.1", [0.35, 0.5], 1.0, 310), "variant": "snake+kd", "kd_alpha": 4.0},
        {**summary("snake", "dirichlet:0.1", [0.3, 0.41], 0.5, 300), "variant": "snake+fp16"},
        {**summary("fedavg", "dirichlet:0.1", [0.3, 0.45], 4.0, 600), "variant": "fedavg"},
    ]
    result = write_report(runs, tmp_path, 0.8, "title")
    by = {(r["partition"], next(k for k in r if k.endswith("_bytes"))): r for r in result["ratios"]}
    assert by["dirichlet:0.1", "snake_over_fedavg_bytes"]["snake_over_fedavg_bytes"] == 0.25
    kd = by["dirichlet:0.1", "snake+kd_over_snake_bytes"]
    assert kd["accuracy_gap_points"] == 10.0
    assert by["dirichlet:0.1", "snake+fp16_over_snake_bytes"]["snake+fp16_over_snake_bytes"] == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "| snake+kd / dirichlet:0.1 | 0.5000 |" in report and "snake+kd_over_snake_bytes = 1.0" in report


def test_compare_variants_configure_each_run() -> None:
    import pytest

    from coordinator.compare import DEFAULT_KD_ALPHA, variant
    from coordinator.config import TrialConfig
    from coordinator.errors import CoordinatorError

    base = TrialConfig()
    kd = variant(base, "snake+kd")
    assert kd.algorithm == "snake" and kd.train.kd_alpha == DEFAULT_KD_ALPHA and kd.transfer.compression == "none"
    both = variant(base, "fedavg+fp16+kd")
    assert both.algorithm == "fedavg" and both.transfer.compression == "fp16" and both.train.kd_alpha > 0
    with_kd = variant(base, "snake+kd")
    assert variant(with_kd, "snake").train.kd_alpha == 0.0  # plain means without distillation
    assert variant(with_kd, "snake+kd").train.kd_alpha == DEFAULT_KD_ALPHA  # the trial's own alpha is kept
    for bad in ("snek", "snake+kd+kd", "snake+zip"):
        with pytest.raises(CoordinatorError):
            variant(base, bad)


def test_seeds_give_medians_and_ratios_of_medians(tmp_path: Path) -> None:
    runs = []
    for seed, (snake, fedavg) in enumerate([(0.70, 0.80), (0.90, 0.78), (0.80, 0.79)]):
        runs += [summary("snake", "dirichlet:0.3", [0.5, snake], 1.0, 100) | {"variant": "snake", "seed": seed},
                 summary("fedavg", "dirichlet:0.3", [0.5, fedavg], 4.0, 200) | {"variant": "fedavg", "seed": seed}]  # fmt: skip
    result = write_report(runs, tmp_path, 0.8, "title")
    snake = next(r for r in result["over_seeds"] if r["variant"] == "snake")
    assert snake["seeds"] == 3 and snake["final_test_accuracy"] == 0.8 and snake["accuracy_min"] == 0.7
    assert snake["reached_target"] == 2 and snake["rounds_to_target"] == 2
    (ratio,) = result["ratios"]
    assert ratio["accuracy_gap_points"] == 1.0 and ratio["snake_over_fedavg_bytes"] == 0.25
    assert "## Over seeds" in (tmp_path / "report.md").read_text()
