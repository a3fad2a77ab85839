"""Every lowered operator graph, run here, reproduces ORT's training kernel (outputs recorded in the main env)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

pytestmark = pytest.mark.portable


def _session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_every_lowered_operator_matches_the_training_kernel(portable_cases: Path) -> None:
    folder = portable_cases / "ops"
    index = json.loads((folder / "index.json").read_text())
    assert len(index) >= 50
    failures = []
    for case in index:
        data = np.load(folder / f"{case['name']}.npz")
        feeds = {key[3:]: data[key] for key in data.files if key.startswith("in:")}
        session = _session(folder / f"{case['name']}.onnx")
        if case["seed"] is not None:
            onnxruntime.set_seed(case["seed"])
        for name, got in zip(case["outputs"], session.run(case["outputs"], feeds), strict=True):
            want = data[f"out:{name}"]
            if got.shape != want.shape:
                failures.append(f"{case['name']}:{name} shape {got.shape}, expected {want.shape}")
            elif not np.allclose(got, want, rtol=case["rtol"], atol=case["atol"]):
                failures.append(f"{case['name']}:{name} max |diff| {np.abs(got - want).max():.3g}")
    assert not failures, failures
