"""A mixed-architecture trial: one agent in a Debian arm64 root under qemu-user emulation (the wheel with the
``agent-portable`` extra, aarch64 onnxruntime), one native, on the host's mosquitto. Needs the root built
by ``python tools/arm64_root.py build`` (setup, downloads); skips with the reason where it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import RunningBroker
from coordinator.config import load_trial
from coordinator.trial import run_trial
from edge_agent.data import load_dataset
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors
from edge_agent.protocol.envelope import decode
from tools import arm64_root

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
DATA = Path("/usr/share/datasets/fashion-mnist")


def _agent_args(agent_id: str, part: str, broker: str, cache: Path) -> list[str]:
    return ["run", "--broker", broker, "--agent-id", agent_id, "--data", f"fashion-mnist:{DATA}", "--partition",
            "iid", "--part", part, "--samples", "500", "--val-fraction", "0.01", "--backend", "portable",
            "--no-calibrate", "--cache-dir", str(cache)]  # fmt: skip


def test_an_arm64_agent_under_emulation_trains_a_conv_segment(mosquitto: RunningBroker, tmp_path: Path) -> None:
    if (reason := arm64_root.root_reason(arm64_root.DEFAULT_ROOT)) is not None:
        pytest.skip(f"no emulated arm64 agent here: {reason}")
    watcher = MqttLink(parse_broker_url(mosquitto.url), f"watcher-{uuid.uuid4().hex[:6]}",
                       [f"{topics.ROOT}/agents/+/inbox", f"{topics.ROOT}/+/inbox"], clean_session=True,
                       inbox_bytes=1 << 40)  # reads after the trial: no inbox budget  # fmt: skip
    watcher.start()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("arm64", "x86")}
    tool = [sys.executable, str(REPO / "tools" / "arm64_root.py"), "run", "--bind", str(DATA), "--bind", str(tmp_path)]
    arm = subprocess.Popen([*tool, "--", "snake-agent", *_agent_args("arm64", "0/2", mosquitto.url, tmp_path / "c-arm")],
                           stdout=logs["arm64"], stderr=subprocess.STDOUT)  # fmt: skip
    x86 = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", *_agent_args("x86", "1/2", mosquitto.url,
                            tmp_path / "c-x86")], stdout=logs["x86"], stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    started = time.monotonic()
    try:
        config = load_trial(None, {"model": "cnn", "agents": 2, "rounds": 1, "train.batch_size": 64,
                                   "train.max_steps": 3})  # fmt: skip
        summary = run_trial(config, mosquitto.url, tmp_path / "run", load_dataset("fashion-mnist"), exit_agents=True,
                            show_progress=False)  # fmt: skip
        arm.wait(120), x86.wait(60)
    finally:
        for proc in (arm, x86):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for handle in logs.values():
            handle.close()
        sent, hellos = _watched(watcher)
    wall = time.monotonic() - started
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert hellos["arm64"]["arch"] == "aarch64" and hellos["x86"]["arch"] == "x86_64"
    assert hellos["arm64"]["backend"] == "portable" and "onnxruntime" in hellos["arm64"]["versions"]
    hop = next(h for h in lines if h["agent"] == "arm64")
    groups = set(summary["segments"][hop["segment"]]["groups"])
    assert groups & {"conv0", "conv1"}, groups  # it computed convolution gradients
    before, after = sent[hop["hop"]], sent[hop["hop"] + 1]
    assert set(before) == set(after)  # both hand-overs carried the whole model (first visits)
    for name in before:
        if "running_" in name or "num_batches" in name:
            continue
        changed = not np.array_equal(before[name], after[name])
        assert changed == (name.split(".")[0] in groups), name  # frozen tensors bit-identical, its segment changed
    times = {h["agent"]: h["train_s"] for h in lines}
    print(json.dumps({"wall_s": round(wall, 1), "train_s": times, "segments": {h["agent"]: sorted(
        summary["segments"][h["segment"]]["groups"]) for h in lines},
        "final_test_accuracy": summary["final_test_accuracy"]}))  # fmt: skip
    assert summary["final_test_accuracy"] > 0.1


def _watched(watcher: MqttLink) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, dict]]:
    frames: dict[str, dict[int, bytes]] = {}
    meta: dict[str, dict] = {}
    hellos: dict[str, dict] = {}
    while (msg := watcher.get(timeout=0.5)) is not None:
        try:
            env = decode(msg.payload)
        except Exception:  # noqa: BLE001 - only hellos and model transfers matter here
            continue
        if str(getattr(env.type, "value", env.type)) == "hello":
            hellos[env.src] = env.body
        elif env.body.get("purpose") == "model":
            frames.setdefault(env.body["transfer_id"], {})[env.body["seq"]] = env.data or b""
            meta[env.body["transfer_id"]] = env.body
    watcher.stop()
    sent = {meta[t]["meta"]["hop"]: decode_tensors(b"".join(p[i] for i in sorted(p))) for t, p in frames.items()}
    return sent, hellos
