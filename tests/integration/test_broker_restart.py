"""The broker restarts while a model is in flight between two agents: the trial completes with the model
it has without the restart. Real mosquitto (its own, so it can be restarted), real agent processes."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest

from coordinator.broker import RunningBroker, start_broker
from coordinator.config import Timeouts, TrialConfig, load_trial
from coordinator.simulate import SimOptions, simulate
from tools.broker_chaos import Chaos

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(180)]

OPTIONS = SimOptions(show_progress=False, calibrate=False)  # equal speeds: the same plan every time
CHUNK = 4096  # the smallest chunk a trial accepts: the mlp's 2.3 MB model travels as ~555 publishes


def trial() -> TrialConfig:
    overrides = {"model": "mlp", "agents": 2, "rounds": 2, "samples_per_agent": 300, "train.batch_size": 32}
    return load_trial(None, overrides | {"transfer.chunk_bytes": CHUNK})


def model_digest(out: Path) -> str:
    """sha256 over the final inference model's weights (the ONNX file's other bytes may differ per export)."""
    model = onnx.load(str(out / "final_model.onnx"), load_external_data=False)
    return hashlib.sha256(b"".join(t.raw_data for t in model.graph.initializer)).hexdigest()


def hop_digests(out: Path) -> list[str]:
    return [json.loads(line)["model_sha256"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_with_restart(
    tmp_path: Path, kill: bool, down_s: float = 0.0, **overrides: object
) -> tuple[Chaos, dict[str, Any], float]:
    """The trial on its own mosquitto, restarted at the first model chunk one agent sends another."""
    config = replace(trial(), **overrides) if overrides else trial()
    with start_broker("mosquitto", workdir=tmp_path / "broker") as broker:
        chaos = Chaos(broker, kill, down_s, every_s=None)
        began = time.monotonic()
        try:
            summary = simulate(config, tmp_path / "restart", replace(OPTIONS, broker=broker.url))
        finally:
            chaos.close()
        return chaos, summary, time.monotonic() - began


@pytest.fixture(scope="module")
def baseline(mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """The same trial twice without a restart: same-seed trials on the same plan end on bit-identical models
    (with calibrated agents the plan, and so the model, depends on which agent measured itself faster)."""
    outs = [tmp_path_factory.mktemp(f"baseline{i}") for i in range(2)]
    for out in outs:
        simulate(trial(), out, replace(OPTIONS, broker=mosquitto.url))
    assert model_digest(outs[0]) == model_digest(outs[1]) and hop_digests(outs[0]) == hop_digests(outs[1])
    return model_digest(outs[0]), hop_digests(outs[0])


def resends(out: Path) -> str:
    return "".join(p.read_text() for p in (out / "logs").glob("*.log"))


def test_a_clean_broker_restart_mid_transfer_changes_nothing(tmp_path: Path, baseline: tuple[str, list[str]]) -> None:
    """SIGTERM while the first agent-to-agent model is in flight: mosquitto saves every session and queue,
    every client reconnects and the transfer carries on where it was; nothing is sent again from scratch."""
    chaos, summary, wall = run_with_restart(tmp_path, kill=False)
    out = tmp_path / "restart"
    assert chaos.restarts == 1 and chaos.cut["hop"] >= 1
    assert chaos.cut["seen_before"] < chaos.cut["count"]  # the restart cut the transfer
    assert len(chaos.seen[chaos.cut["transfer_id"]]) == chaos.cut["count"]
    assert summary["hops"] == 4 and [a["hops"] for a in summary["agents"]] == [2, 2]
    assert (model_digest(out), hop_digests(out)) == baseline
    logs = resends(out)
    assert "is back on" in logs and "session resumed" in logs  # the agents' links came back to their sessions
    assert "no ack for transfer" not in logs  # no transfer was sent again whole
    assert "chunks missing" not in logs  # nor a chunk of it
    print(f"clean restart: {wall:.1f} s, {chaos.cut}")


def test_a_killed_broker_mid_transfer_still_ends_on_the_same_model(
    tmp_path: Path, baseline: tuple[str, list[str]]
) -> None:
    """SIGKILL while the first agent-to-agent model is in flight: mosquitto comes back from its last
    autosave, so whatever it held for the receiver since then is gone; the receiver asks for the missing
    chunks (or the sender sends the transfer again after its ack timeout) and the trial ends as before."""
    chaos, summary, wall = run_with_restart(tmp_path, kill=True)
    out = tmp_path / "restart"
    assert chaos.restarts == 1 and chaos.cut["seen_before"] < chaos.cut["count"]
    assert summary["hops"] == 4
    assert model_digest(out) == baseline[0]
    print(f"SIGKILL: {wall:.1f} s, {chaos.cut}")


def test_an_outage_longer_than_the_timers_needs_no_resend(tmp_path: Path, baseline: tuple[str, list[str]]) -> None:
    """A clean restart that keeps the broker down 12 s, longer than the receiver's stale timer and than a
    hop_s of 8 s: every message waits in the broker, so nothing should be asked for or resent."""
    chaos, summary, _ = run_with_restart(tmp_path, kill=False, down_s=12.0, timeouts=Timeouts(hop_s=8.0))
    assert summary["hops"] == 4 and model_digest(tmp_path / "restart") == baseline[0]
    assert "chunks missing" not in resends(tmp_path / "restart")
