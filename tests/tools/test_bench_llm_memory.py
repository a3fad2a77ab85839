"""The LLM memory benchmark, one tiny representative run: the trials' GPT, two measured child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.ort, pytest.mark.torch]
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_gpt_run_writes_hop_and_full_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpt.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_llm_memory.py"), "--model", "gpt", "--seq", "16"]
    cmd += ["--batch", "2", "--steps", "2", "--slice", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    report = json.loads(out.read_text())
    hop, full = report["result"]["snake-hop"], report["result"]["full"]
    assert hop["ok"] and full["ok"]
    assert 20 < hop["peak_mb"] <= full["peak_mb"] * 1.05  # same runtime, less state
    assert report["model"]["slice_groups"] == ["blocks.0"] and not report["model"]["external_data"]
    cases = report["model"]["cases"]
    assert cases["snake-hop"]["trainable_parameters"] < cases["full"]["trainable_parameters"]
    assert report["hop_transfer_bytes"]["snake-hop_tensors"] == 4 * cases["snake-hop"]["trainable_parameters"]
    assert len(hop["losses"]) == 2 and report["ratio_peak"] == pytest.approx(hop["peak_mb"] / full["peak_mb"])
