"""The broker restarts while a model is in flight between two agents: the trial completes with the model
it has without the restart. Real mosquitto (its own, so it can be restarted), real agent processes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker import RunningBroker, start_broker
from coordinator.config import TrialConfig, load_trial
from coordinator.simulate import SimOptions, simulate
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import decode

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


class Saboteur:
    """Watches ``snake/#``; at the first model chunk that one agent sends another (hop >= 1), restarts
    the broker from its own thread, and notes how much of that transfer had gone through by then."""

    def __init__(self, broker: RunningBroker, kill: bool) -> None:
        self.broker, self.kill = broker, kill
        self.seen: dict[str, set[int]] = {}  # transfer id -> chunk seqs seen
        self.target: dict[str, Any] = {}
        self.restarted, self._fire = threading.Event(), threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="saboteur", protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{topics.ROOT}/#", qos=1)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._restart, daemon=True)
        self.thread.start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.payload[:4] != b"SNK1" or "/agents/" not in msg.topic:
            return
        env = decode(bytes(msg.payload))
        body = env.body
        if body["purpose"] != "model" or env.src == topics.COORDINATOR:
            return
        self.seen.setdefault(body["transfer_id"], set()).add(body["seq"])
        if not self.target and body["meta"].get("hop", 0) >= 1:
            self.target.update(transfer_id=body["transfer_id"], count=body["count"], hop=body["meta"]["hop"])
            self._fire.set()

    def _restart(self) -> None:
        self._fire.wait()
        self.broker.restart(kill=self.kill)
        self.target["seen_before"] = len(self.seen[self.target["transfer_id"]])
        self.restarted.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_with_restart(tmp_path: Path, kill: bool) -> tuple[Saboteur, dict[str, Any], float]:
    with start_broker("mosquitto", workdir=tmp_path / "broker") as broker:
        saboteur = Saboteur(broker, kill)
        began = time.monotonic()
        try:
            summary = simulate(trial(), tmp_path / "restart", replace(OPTIONS, broker=broker.url))
        finally:
            saboteur.close()
        return saboteur, summary, time.monotonic() - began


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
    saboteur, summary, wall = run_with_restart(tmp_path, kill=False)
    out = tmp_path / "restart"
    assert saboteur.restarted.is_set()
    assert saboteur.target["seen_before"] < saboteur.target["count"]  # the restart cut the transfer
    assert len(saboteur.seen[saboteur.target["transfer_id"]]) == saboteur.target["count"]
    assert summary["hops"] == 4 and [a["hops"] for a in summary["agents"]] == [2, 2]
    assert (model_digest(out), hop_digests(out)) == baseline
    logs = resends(out)
    assert "is back on" in logs and "session resumed" in logs  # the agents' links came back to their sessions
    assert "no ack for transfer" not in logs  # no transfer was sent again whole
    print(f"clean restart: {wall:.1f} s, {saboteur.target}")


def test_a_killed_broker_mid_transfer_still_ends_on_the_same_model(
    tmp_path: Path, baseline: tuple[str, list[str]]
) -> None:
    """SIGKILL while the first agent-to-agent model is in flight: mosquitto comes back from its last
    autosave, so whatever it held for the receiver since then is gone; the receiver asks for the missing
    chunks (or the sender sends the transfer again after its ack timeout) and the trial ends as before."""
    saboteur, summary, wall = run_with_restart(tmp_path, kill=True)
    out = tmp_path / "restart"
    assert saboteur.restarted.is_set()
    assert saboteur.target["seen_before"] < saboteur.target["count"]
    assert summary["hops"] == 4
    assert model_digest(out) == baseline[0]
    print(f"SIGKILL: {wall:.1f} s, {saboteur.target}")
