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
