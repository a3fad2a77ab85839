"""A LoRA snake trial end to end: real mosquitto, agent processes on both backends, real Fashion-MNIST.
Segments train only adapters; once an agent holds the frozen tensors, only adapters travel to it; the
final ONNX is merged (no adapter tensors, the plain model's input and output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from coordinator.broker import RunningBroker
from coordinator.config import load_trial
from coordinator.simulate import SimOptions, simulate

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]


def test_a_lora_trial_trains_adapters_and_hands_on_only_them(mosquitto: RunningBroker, tmp_path: Path) -> None:
    config = load_trial(
        None,
        {
            "model": "mlp", "agents": 3, "rounds": 2, "samples_per_agent": 600, "train.batch_size": 32,
            "train.lr": 0.003, "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "fc0,fc1,fc2,head",
        },
    )  # fmt: skip
    summary = simulate(
        config, tmp_path, SimOptions(broker=mosquitto.url, show_progress=False, backends=("ort", "portable"))
    )
    assert summary["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["fc0", "fc1", "fc2", "head"]}
    assert summary["hops"] == 6 and summary["final_test_accuracy"] > 0.3  # chance: 0.1
    adapters = 4 * (784 + 512 + 512 + 256 + 256 + 128 + 128 + 10)  # rank * (in + out) per projection
    assert sum(s["params"] for s in summary["segments"]) <= 2 * adapters
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["trainable_params"] <= adapters for line in lines)
    whole = max(line["model_bytes"] for line in lines)
    assert whole > 4 * (784 * 512 + 512 * 256 + 256 * 128)  # the frozen weights travelled to fresh receivers
    seen = {lines[0]["agent"]}  # it got the initial model from the coordinator
    for line in lines:  # hop h's output goes to hop h+1's agent (the last one to the coordinator, which holds them)
        receiver = lines[line["hop"] + 1]["agent"] if line["hop"] + 1 < len(lines) else "coordinator"
        if receiver in seen or receiver == "coordinator":
            assert line["model_bytes"] < 4 * adapters + 4096, line  # adapters (and a header) only
        seen.add(receiver)
    model = onnx.load(tmp_path / "final_model.onnx")
    assert not any("lora" in init.name for init in model.graph.initializer)
    session = ort.InferenceSession(str(tmp_path / "final_model.onnx"))
    logits = session.run(None, {"input": np.zeros((5, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (5, 10)
