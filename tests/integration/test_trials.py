"""Whole trials: a real mosquitto, real agent processes, real ONNX Runtime training, real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
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
from edge_agent.protocol.errors import ProtocolError
from models import InputSpec, build_model, layer_groups
from tests.capped import require_memcap
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
    assert summary["plan"]["hops"][0]["est_mb"] > 0  # planned from the agents' reported budgets and speeds
    last = summary["segments"][lines[-1]["segment"]]["groups"][-1]
    assert last == layer_groups(build_model("mlp", InputSpec()))[-1]  # the trial ends on the output side
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
            parse_broker_url(broker),
            f"meddler-{uuid.uuid4().hex[:6]}",
            [f"{topics.ROOT}/+/inbox", f"{topics.ROOT}/agents/+/inbox"],
            clean_session=True,  # a persistent session would keep collecting later tests' traffic in the broker
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
    watcher = MqttLink(  # reads only after the trial: no inbox budget, or paho holds the frames back meanwhile
        parse_broker_url(mosquitto.url),
        f"watcher-{uuid.uuid4().hex[:6]}",
        [f"{topics.ROOT}/agents/+/inbox", f"{topics.ROOT}/+/inbox"],
        clean_session=True,  # a session kept by an earlier test's "watcher" would replay its backlog here
        inbox_bytes=1 << 40,
    )
    watcher.start()
    try:
        summary = run(small(model="cnn", agents=2, rounds=2, samples_per_agent=300), tmp_path, mosquitto.url)
    finally:
        frames: dict[str, dict[int, bytes]] = {}
        meta: dict[str, dict] = {}
        while (msg := watcher.get(timeout=0.5)) is not None:
            if msg.payload[:4] == b"SNK1":
                try:
                    env = decode(msg.payload)
                except ProtocolError:
                    continue  # not this trial's: foreign clients of other tests (the fuzzer) share this broker
                if env.body["purpose"] == "model":
                    frames.setdefault(env.body["transfer_id"], {})[env.body["seq"]] = env.data or b""
                    meta[env.body["transfer_id"]] = env.body
        watcher.stop()
    sent: dict[int, dict[str, np.ndarray]] = {}
    for tid, parts in frames.items():
        sent[meta[tid]["meta"]["hop"]] = decode_tensors(b"".join(parts[i] for i in sorted(parts)))
    assert sorted(sent) == [0, 1, 2, 3, 4]  # initial model + after each of 4 hops
    groups_of = {s["index"]: set(s["groups"]) for s in summary["segments"]}
    route = [(h["agent"], h["segment"]) for h in summary["plan"]["hops"]] + [("coordinator", -1)]
    # the whole model before each hop, where the wire shows it: a hop an agent hands to itself
    # (it trains twice in a row) moves only running statistics, its trained groups stay in its cache
    models, cached = {0: sent[0]}, {}  # cached: each agent's copy of its last output
    deltas = 0
    for hop in range(1, 5):  # a delta leaves out the groups its receiver holds, unchanged since its last hop
        receiver, sender = route[hop][0], route[hop - 1][0]
        mine = [h for h in range(hop) if route[h][0] == receiver]
        expected = set().union(*(groups_of[route[h][1]] for h in range(mine[-1] + 1, hop))) if mine else None
        travelled = {n.split(".")[0] for n in sent[hop] if "running_" not in n and "num_batches" not in n}
        if expected is None:
            assert set(sent[hop]) == set(sent[0]), hop  # a first visit gets everything
        else:
            assert travelled == expected, hop
            deltas += 1
        if receiver != sender:
            models[hop] = {**cached.get(receiver, {}), **sent[hop]}
            assert set(models[hop]) == set(sent[0]), hop
            cached[sender] = models[hop]
    assert deltas  # some hop in this plan reached an agent that had a copy
    known = sorted(models)
    for start, end in zip(known, known[1:], strict=False):  # hops start..end-1 changed these groups only
        before, after = models[start], models[end]
        owned = [
            n for n in before if n.split(".")[0] in set().union(*(groups_of[route[h][1]] for h in range(start, end)))
        ]
        assert owned
        for name in before:
            changed = not np.array_equal(before[name], after[name])
            if "running_" in name:
                assert changed, (start, name)  # every BN layer ran in training mode on this hop's data
            else:
                assert changed == (name in owned), (start, name)


@pytest.mark.timeout(900)  # two VGG-11 trials: ~5 min on a loaded 2-core machine
def test_a_capped_agent_trains_in_snake_and_fedavg_leaves_it_out(mosquitto: RunningBroker, tmp_path: Path) -> None:
    """One agent in a 300 MiB cgroup (a 512 MB board such as a Pi Zero 2 W, after its OS), VGG-11 at batch 64:
    too small for the whole model's training state (FedAvg needs about 363 MiB by the cost model), enough
    for any snake segment (about 240-250 MiB). A 1 GB board holds both: see docs/boards.md."""
    require_memcap()
    trial = tmp_path / "het.toml"
    trial.write_text(
        '[trial]\nmodel = "vgg11"\nagents = 3\nrounds = 1\nsamples_per_agent = 300\n'
        "[train]\nbatch_size = 64\nmax_steps = 3\n[[fleet]]\n[[fleet]]\n[[fleet]]\nmemory_mb = 300\n"
    )
    snake = run(load_trial(trial), tmp_path / "snake", mosquitto.url)
    capped = next(a for a in snake["agents"] if a["agent_id"] == "agent-2")
    assert capped["memory_budget_mb"] == 300 and capped["hops"] == 1  # it reported its cap and trained
    assert capped["peak_rss_mb"] < 300 and not snake["excluded"]
    assert all(h["est_mb"] <= 300 for h in snake["plan"]["hops"] if h["agent"] == "agent-2")
    fedavg = run(load_trial(trial, {"algorithm": "fedavg"}), tmp_path / "fedavg", mosquitto.url)
    assert list(fedavg["excluded"]) == ["agent-2"]
    assert "unable to train" in fedavg["excluded"]["agent-2"] and "300 MiB" in fedavg["excluded"]["agent-2"]
    assert sorted(a["agent_id"] for a in fedavg["agents"] if a["hops"]) == ["agent-0", "agent-1"]
    uncapped = [a["peak_rss_mb"] for a in fedavg["agents"] if a["hops"]]
    assert min(uncapped) > 300  # the whole model really needs more than the cap: the refusal was right


def test_split_learning_baseline_on_the_same_agents(mosquitto: RunningBroker, tmp_path: Path) -> None:
    """Agents train the front (conv0) batch by batch against the coordinator's back over the real broker."""
    config = small(model="cnn", agents=2, rounds=2, samples_per_agent=1000, algorithm="split")
    summary = run(config, tmp_path, mosquitto.url)
    assert summary["algorithm"] == "split" and summary["mode"] == "cs" and summary["split_cut"] == "conv0"
    assert summary["hops"] == 4 and [a["hops"] for a in summary["agents"]] == [2, 2]
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    assert [r["round"] for r in summary["round_test"]] == [0, 1]  # front + back assembled after every round
    lines = hop_lines(tmp_path)
    assert all(h["val_accuracy"] is None and 0 < h["train_loss"] < 2.5 for h in lines)
    steps = sum(h["steps"] for h in lines)
    assert steps == 4 * (900 // 32)  # 1000 samples, 10 % validation, batches of 32, every batch answered once
    # one batch of activations: 32 x 32 x 14 x 14 float32 (+ labels); as much comes back as gradients
    batch = 32 * 32 * 14 * 14 * 4
    assert summary["bytes_activations"] >= steps * batch and summary["bytes_gradients"] >= steps * batch
    assert summary["bytes_total"] > summary["bytes_activations"] + summary["bytes_gradients"]
    for agent in summary["agents"]:  # each agent sent its own activations and received its gradients
        assert agent["bytes_sent"] >= 2 * (900 // 32) * batch and agent["bytes_received"] >= 2 * (900 // 32) * batch
        assert agent["max_trainable_params"] == summary["segments"][0]["params"] == 352  # conv0 only
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "ms waiting for gradients" in logs


class DeafBack:
    """A back that cannot use any batch (as if the coordinator's side were broken): no gradient ever comes."""

    def __init__(self, *args: object) -> None:
        self.calls = 0

    def step(self, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        self.calls += 1
        raise ValueError("this back takes no batches")

    def tensors(self) -> dict[str, np.ndarray]:
        return {}


@pytest.mark.expect_errors
def test_a_gradient_that_never_comes_fails_the_hop_with_a_reason(
    mosquitto: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.trial
    from coordinator.errors import TrialError

    monkeypatch.setattr(coordinator.trial, "TorchBack", DeafBack)
    config = small(
        model="cnn", agents=2, rounds=1, samples_per_agent=200, algorithm="split", **{"timeouts.gradient_s": 2.0}
    )
    with pytest.raises(TrialError, match="no gradient for batch 0 of hop 0 from the coordinator within 2 s"):
        run(config, tmp_path, mosquitto.url)
    log = (tmp_path / "logs" / "agent-0.log").read_text()
    assert "does not fit the back" in log  # the coordinator answered the batch with an error, never a gradient
    # the agent reported the failure and stayed up until the coordinator told it to exit
    assert "agent exits: trial failed: hop 0 failed on agent-0: TrainerError: no gradient for batch 0" in log


def model_cache(out: Path, agent: str) -> Path:
    return out / "cache" / agent / "models" / "last_model.safetensors"


def test_an_agent_that_lost_its_cached_model_fetches_the_whole_model(mosquitto: RunningBroker, tmp_path: Path) -> None:
    """The first agent due a delta from another agent loses its cached copy while the sender trains: it
    asks the sender for the whole model, and the trial ends as usual. The watcher reads the plan from
    the assignments (``next_holds``: what the sender may leave out)."""
    watcher = MqttLink(
        parse_broker_url(mosquitto.url),
        f"cache-wiper-{uuid.uuid4().hex[:6]}",
        [topics.coordinator_inbox(), f"{topics.ROOT}/agents/+/inbox"],
        clean_session=True,
    )
    watcher.start()
    stop, wiped = threading.Event(), threading.Event()
    tasks: dict[int, tuple[str, dict]] = {}  # hop -> (agent, its task)
    target: list[tuple[int, str]] = []  # (hop, agent) whose delta meets a missing copy
    transfers: list[tuple[str, int, int]] = []  # (receiver, hop, size) of model transfers

    def wipe() -> None:
        while not stop.is_set():
            msg = watcher.get(timeout=0.05)
            if msg is None:
                continue
            if msg.payload[:4] == b"SNK1":
                env = decode(msg.payload)
                if env.body["purpose"] == "model" and env.body["seq"] == 0:
                    transfers.append((env.dst, env.body["meta"]["hop"], env.body["size"]))
                continue
            env = decode(msg.payload)
            if env.type == "assign":
                tasks.update({t["hop"]: (env.dst, t) for t in env.body["tasks"]})
            elif env.type == "hop_started" and not wiped.is_set():
                if not target:
                    target.append(next(
                        (h, tasks[h][0]) for h in sorted(tasks)[1:]
                        if tasks[h - 1][1]["next_holds"] and tasks[h - 1][0] != tasks[h][0]
                    ))  # fmt: skip
                hop, agent = target[0]
                if env.body["hop"] == hop - 1:  # the receiver's copy was written on its earlier hop
                    assert model_cache(tmp_path, agent).is_file()
                    model_cache(tmp_path, agent).unlink()
                    wiped.set()

    thread = threading.Thread(target=wipe, daemon=True)
    thread.start()
    try:
        summary = run(small(model="cnn", agents=3, rounds=2, samples_per_agent=300), tmp_path, mosquitto.url)
    finally:
        stop.set()
        thread.join(5)
        watcher.stop()
    assert wiped.is_set()
    assert summary["hops"] == 6 and summary["final_test_accuracy"] > 0.3
    hop, agent = target[0]
    sizes = [size for dst, h, size in transfers if (dst, h) == (agent, hop)]
    assert len(sizes) == 2 and sizes[0] < sizes[1]  # the delta, then the whole model
    sender = tasks[hop - 1][0]
    logs = (tmp_path / "logs" / f"{agent}.log").read_text()
    assert f"asking {sender} for the whole model" in logs
