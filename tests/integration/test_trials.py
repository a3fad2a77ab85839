"""Whole trials: a real mosquitto, real agent processes, real ONNX Runtime training, real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from coordinator.broker import RunningBroker
from coordinator.config import TrialConfig, load_trial
from coordinator.simulate import SimOptions, simulate
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors
from edge_agent.protocol.envelope import decode
from tests.integration.mqtt_proxy import CorruptingProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]


def small(**overrides: object) -> TrialConfig:
    base = {"model": "mlp", "agents": 3, "rounds": 2, "samples_per_agent": 600, "train.batch_size": 32}
    return load_trial(None, base | overrides)


def run(config: TrialConfig, out: Path, broker: str) -> dict:
    return simulate(config, out, SimOptions(broker=broker, show_progress=False))


def hop_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_small_trial_end_to_end(mosquitto: RunningBroker, tmp_path: Path) -> None:
    summary = run(small(), tmp_path, mosquitto.url)
    assert summary["final_test_accuracy"] > 0.5  # 2 rounds on 600 samples per agent: well above chance (0.1)
    assert summary["test_samples"] == 10_000
    assert [a["hops"] for a in summary["agents"]] == [2, 2, 2]
    assert all(a["peak_rss_mb"] > 0 and a["bytes_sent"] > 0 for a in summary["agents"])
    lines = hop_lines(tmp_path)
    assert [h["hop"] for h in lines] == list(range(6))
    for agent in ("agent-0", "agent-1", "agent-2"):  # segments rotate over rounds
        assert len({h["segment"] for h in lines if h["agent"] == agent}) == 2
    assert lines[-1]["segment"] == len(summary["segments"]) - 1  # the trial ends on the output side
    # the deployable model runs in plain InferenceSession and answers for a batch
    session = ort.InferenceSession(str(tmp_path / "final_model.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((5, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (5, 10)
    assert (tmp_path / "training.png").stat().st_size > 0


def test_client_server_mode_forwards_every_hop(mosquitto: RunningBroker, tmp_path: Path) -> None:
    summary = run(small(mode="cs", agents=2, rounds=1), tmp_path, mosquitto.url)
    assert summary["mode"] == "cs" and summary["hops"] == 2
    # every model passes the coordinator: it sent the initial model and forwarded one, plus artifacts
    assert summary["bytes_coordinator_sent"] > 2 * hop_lines(tmp_path)[0]["model_bytes"]


def test_fedavg_baseline_on_the_same_agents(mosquitto: RunningBroker, tmp_path: Path) -> None:
    snake = run(small(agents=2, rounds=2), tmp_path / "snake", mosquitto.url)
    fedavg = run(small(agents=2, rounds=2, algorithm="fedavg"), tmp_path / "fedavg", mosquitto.url)
    assert fedavg["algorithm"] == "fedavg" and fedavg["mode"] == "cs" and fedavg["hops"] == 4
    assert fedavg["final_test_accuracy"] > 0.5
    # every FedAvg agent trains the whole model; a snake agent never holds more than its segments
    full = sum(s["params"] for s in fedavg["segments"])
    assert all(a["max_trainable_params"] == full for a in fedavg["agents"])
    assert all(a["max_trainable_params"] < full for a in snake["agents"])
    # FedAvg moves the whole model down and up for every agent and round; snake once per hop
    assert snake["bytes_total"] < 0.75 * fedavg["bytes_total"]


def test_a_mixed_ort_and_portable_fleet_trains_one_model(mosquitto: RunningBroker, tmp_path: Path) -> None:
    options = SimOptions(broker=mosquitto.url, backends=("ort", "portable"), show_progress=False)
    summary = simulate(small(model="cnn", agents=2, rounds=2, samples_per_agent=400), tmp_path, options)
    assert [a["backend"] for a in summary["agents"]] == ["ort", "portable"]
    assert summary["hops"] == 4 and summary["final_test_accuracy"] > 0.4
    bundles = {p.name for p in (tmp_path / "cache" / "agent-1" / "artifacts").iterdir()}
    assert bundles and bundles.isdisjoint(p.name for p in (tmp_path / "cache" / "agent-0" / "artifacts").iterdir())


def test_knowledge_distillation_trial_on_both_backends(mosquitto: RunningBroker, tmp_path: Path) -> None:
    options = SimOptions(broker=mosquitto.url, backends=("ort", "portable"), show_progress=False)
    config = small(model="cnn", agents=2, rounds=2, samples_per_agent=400, partition="dirichlet:0.5")
    summary = simulate(
        dataclasses.replace(config, train=dataclasses.replace(config.train, kd_alpha=2.0)), tmp_path, options
    )
    assert summary["hops"] == 4 and summary["final_test_accuracy"] > 0.2
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/artifacts/*/manifest.json")]
    assert manifests and all(m.get("kd") for m in manifests)  # every bundle an agent trained with carries the KD loss


def test_corrupted_chunk_is_requested_again(mosquitto: RunningBroker, tmp_path: Path) -> None:
    proxy = CorruptingProxy(mosquitto.port, corrupt_over=100_000)
    try:
        summary = run(small(agents=2, rounds=1), tmp_path, proxy.url)
    finally:
        proxy.close()
    assert proxy.corrupted == 1
    assert summary["hops"] == 2 and summary["final_test_accuracy"] > 0.3
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "failed its digest; asking again" in logs


class Meddler:
    """A client on the real broker that republishes every inbox message once more, or sprays garbage."""

    def __init__(self, broker: str, duplicate: bool) -> None:
        self.link = MqttLink(
            parse_broker_url(broker), "meddler", [f"{topics.ROOT}/+/inbox", f"{topics.ROOT}/agents/+/inbox"]
        )
        self.duplicate = duplicate
        self.seen: set[bytes] = set()
        self.count = 0
        self.stop = threading.Event()
        self.link.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        garbage = [
            b"",
            b"\x00\xff\xfe",
            b"{not json",
            b"[]",
            b'{"v": 99, "type": "hello"}',
            b"SNK1\x00\x00\x00\x09{}",
            b"SNK1\xff\xff\xff\xff",
        ]
        sprayed: set[str] = set()
        while not self.stop.is_set():
            msg = self.link.get(timeout=0.05)
            if msg is None:
                continue
            if self.duplicate and msg.payload not in self.seen:
                self.seen.add(msg.payload)
                self.link.publish(msg.topic, msg.payload)
                self.count += 1
            elif not self.duplicate and msg.topic not in sprayed:
                sprayed.add(msg.topic)
                for junk in garbage:
                    self.link.publish(msg.topic, junk)
                    self.count += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.link.stop()


def test_duplicated_messages_change_nothing(mosquitto: RunningBroker, tmp_path: Path) -> None:
    meddler = Meddler(mosquitto.url, duplicate=True)
    try:
        summary = run(small(agents=2, rounds=2), tmp_path, mosquitto.url)
    finally:
        meddler.close()
    assert meddler.count > 20
    lines = hop_lines(tmp_path)
    assert [h["hop"] for h in lines] == [0, 1, 2, 3]  # no hop trained twice, none skipped
    assert [a["hops"] for a in summary["agents"]] == [2, 2]


def test_garbage_in_every_inbox_leaves_every_process_running(mosquitto: RunningBroker, tmp_path: Path) -> None:
    meddler = Meddler(mosquitto.url, duplicate=False)
    try:
        summary = run(small(agents=2, rounds=2), tmp_path, mosquitto.url)
    finally:
        meddler.close()
    assert meddler.count >= 3 * 7  # every inbox (coordinator + 2 agents) got every kind of garbage
    assert summary["hops"] == 4 and all(a["hops"] == 2 for a in summary["agents"])
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "dropped" in logs and "agent exits: trial finished" in logs


def test_each_hop_changes_only_its_segment(mosquitto: RunningBroker, tmp_path: Path) -> None:
    """Watch every model that travels: each hop changes every parameter of its segment and no other
    parameter (bit-identical); BatchNorm running statistics, which are not parameters, follow the data."""
    watcher = MqttLink(
        parse_broker_url(mosquitto.url), "watcher", [f"{topics.ROOT}/agents/+/inbox", f"{topics.ROOT}/+/inbox"]
    )
    watcher.start()
    try:
        summary = run(small(model="cnn", agents=2, rounds=2, samples_per_agent=300), tmp_path, mosquitto.url)
    finally:
        frames: dict[str, dict[int, bytes]] = {}
        meta: dict[str, dict] = {}
        while (msg := watcher.get(timeout=0.5)) is not None:
            if msg.payload[:4] == b"SNK1":
                env = decode(msg.payload)
                if env.body["purpose"] == "model":
                    frames.setdefault(env.body["transfer_id"], {})[env.body["seq"]] = env.data or b""
                    meta[env.body["transfer_id"]] = env.body
        watcher.stop()
    sent: dict[int, dict[str, np.ndarray]] = {}
    for tid, parts in frames.items():
        sent[meta[tid]["meta"]["hop"]] = decode_tensors(b"".join(parts[i] for i in sorted(parts)))
    assert sorted(sent) == [0, 1, 2, 3, 4]  # initial model + after each of 4 hops
    models = {0: sent[0]}
    for hop in range(1, 5):  # a delta leaves out the groups its receiver holds: they did not change
        models[hop] = {**models[hop - 1], **sent[hop]}
    assert len(sent[3]) < len(sent[0])  # agent-0's second hop got only what changed since its first
    segments = {s["index"]: s for s in summary["segments"]}
    for line in hop_lines(tmp_path):
        before, after = models[line["hop"]], models[line["hop"] + 1]
        owned = [n for n in before if n.split(".")[0] in segments[line["segment"]]["groups"]]
        assert owned
        for name in before:
            changed = not np.array_equal(before[name], after[name])
            if "running_" in name:
                assert changed, (line["hop"], name)  # every BN layer ran in training mode on this hop's data
            else:
                assert changed == (name in owned), (line["hop"], name)


def model_cache(out: Path, agent: str) -> Path:
    return out / "cache" / agent / "models" / "last_model.safetensors"


def test_an_agent_that_lost_its_cached_model_fetches_the_whole_model(mosquitto: RunningBroker, tmp_path: Path) -> None:
    """agent-0's copy of its hop-0 output is deleted before hop 2's delta arrives: it asks agent-1 for the
    whole model, and the trial ends as usual."""
    watcher = MqttLink(
        parse_broker_url(mosquitto.url), "cache-wiper", [topics.coordinator_inbox(), f"{topics.ROOT}/agents/+/inbox"]
    )
    watcher.start()
    stop, wiped = threading.Event(), threading.Event()
    to_agent0: list[tuple[int, int]] = []  # (hop, size) of model transfers to agent-0

    def wipe() -> None:
        while not stop.is_set():
            msg = watcher.get(timeout=0.05)
            if msg is None:
                continue
            if msg.payload[:4] == b"SNK1":
                env = decode(msg.payload)
                if env.dst == "agent-0" and env.body["purpose"] == "model" and env.body["seq"] == 0:
                    to_agent0.append((env.body["meta"]["hop"], env.body["size"]))
            elif not wiped.is_set() and b'"hop_done"' in msg.payload:
                env = decode(msg.payload)
                if env.type == "hop_done" and env.src == "agent-0" and env.body["hop"] == 0:
                    assert model_cache(tmp_path, "agent-0").is_file()
                    model_cache(tmp_path, "agent-0").unlink()
                    wiped.set()

    thread = threading.Thread(target=wipe, daemon=True)
    thread.start()
    try:
        summary = run(small(model="cnn", agents=2, rounds=2, samples_per_agent=300), tmp_path, mosquitto.url)
    finally:
        stop.set()
        thread.join(5)
        watcher.stop()
    assert wiped.is_set()
    assert summary["hops"] == 4 and summary["final_test_accuracy"] > 0.3
    hop2 = [size for hop, size in to_agent0 if hop == 2]
    assert len(hop2) == 2 and hop2[0] < hop2[1]  # the delta, then the whole model
    logs = (tmp_path / "logs" / "agent-0.log").read_text()
    assert "asking agent-1 for the whole model" in logs
