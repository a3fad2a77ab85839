"""A whole trial, agents and coordinator state machines, in one thread over the in-memory broker."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from coordinator.controller import Controller, TrialSetup
from coordinator.scheduler import GroupInfo, HopSettings, fedavg_plan, snake_plan
from coordinator.strategy import FedAvgStrategy, SnakeStrategy
from edge_agent.agent import Agent, Counters, HopResult, ResendFull, SayBye, StoreArtifact, Train
from edge_agent.handover import full_model, hand_on, load_model
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.delta import BaseMismatch, decode_model
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.messages import Hello
from edge_agent.trainer import EvalStats, TrainStats
from tests.fakes import MemoryBroker, MemoryModelCache

GROUPS = [GroupInfo(f"g{i}", (f"g{i}.w",), (f"g{i}.stat",), 10 * (i + 1)) for i in range(4)]
SIZE = 1024  # floats per tensor: parameters dominate the bytes, as in a real model
COUNTERS = Counters(0, 0, 1.0)


def hello(agent_id: str) -> Hello:
    return Hello(agent_id, "fake", {}, "x86_64", "Linux", "3.11", 2, 1024, 512, 100, 10, 10, [1, 28, 28], [10] * 10)


@dataclass
class Harness:
    agents: int = 3
    rounds: int = 2
    mode: str = "p2p"
    algorithm: str = "snake"
    checkpoints: bool = False
    compression: str = "none"
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    history: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial = {
            name: np.full(SIZE if name.endswith(".w") else 2, i, np.float32)
            for i, g in enumerate(GROUPS)
            for name in (*g.params, *g.buffers)
        }
        blobs = {}
        for seg in range(4):
            blob = f"bundle-{seg}".encode() * 1000
            blobs[hashlib.sha256(blob).hexdigest()] = blob
        shas = list(blobs)
        fedavg = self.algorithm == "fedavg"
        setup = TrialSetup(
            "t1", self.agents,
            (lambda ids: fedavg_plan(ids, GROUPS, self.rounds)) if fedavg else (lambda ids: snake_plan(ids, GROUPS, self.rounds, self.mode)),
            {(i, "ort"): (shas[i], len(blobs[shas[i]])) for i in range(4)}, blobs, encode_tensors(self.initial),
            HopSettings(1, 8, 0.1, 0, None, self.checkpoints), 1 << 16, self.compression, 60.0, 60.0,
            FedAvgStrategy(self.compression) if fedavg else SnakeStrategy(self.compression),
        )  # fmt: skip
        self.ctl = Controller(setup, 0.0)
        self.broker.subscribe("coordinator", topics.coordinator_inbox())
        self.broker.subscribe("coordinator", topics.ALL_AGENT_STATUS)
        self.machines = {f"a{i}": Agent(hello(f"a{i}"), set(), 1 << 16) for i in range(self.agents)}
        self.caches = {name: MemoryModelCache() for name in self.machines}
        self.wipe_before: dict[int, str] = {}  # hop -> agent whose cached model is lost just before it
        for name in self.machines:
            self.broker.subscribe(name, topics.agent_inbox(name))
        self.events: list[str] = []
        self.round_models: list[tuple[int, bytes]] = []
        self.exited: set[str] = set()  # agents that obeyed a shutdown: they read nothing more

    def run(self, steps: int = 10_000) -> None:
        now = 0.0
        for name, machine in self.machines.items():
            self._apply(name, machine.start(now), now)
        for _ in range(steps):
            now += 0.01
            moved = False
            for client, queue in self.broker.queues.items():
                while queue:
                    moved = True
                    topic, payload = queue.popleft()
                    if client in self.exited:
                        continue
                    if client == "coordinator":
                        step = self.ctl.handle(topic, payload, now)
                        self._publish(step.out)
                        self.events += [e.kind for e in step.events]
                        self.round_models += [e.body for e in step.events if e.kind == "checkpoint"]
                    else:
                        self._apply(client, self.machines[client].handle(topic, payload, now), now)
            if self.ctl.final_model is not None or self.ctl.failed:
                return
            if not moved:
                now += 5.0
                self._publish(self.ctl.tick(now).out)
                for name, machine in self.machines.items():
                    self._apply(name, machine.tick(now, COUNTERS), now)

    def _publish(self, out: list) -> None:
        for o in out:
            self.broker.publish(o.topic, o.payload, o.retain)

    def _apply(self, name: str, fx, now: float) -> None:
        self._publish(fx.out)
        for action in fx.actions:
            machine = self.machines[name]
            if isinstance(action, StoreArtifact):
                self._apply(name, machine.artifact_stored(action.sha256, True, now), now)
            elif isinstance(action, Train):
                self._train(name, action, now)
            elif isinstance(action, ResendFull):
                data = full_model(self.caches[name], action.trial_id, action.hop - 1, action.layout, action.compression)
                self._apply(name, machine.resend(action.dst, action.hop, data, "", now), now)
            elif isinstance(action, SayBye):
                self._publish([machine.bye(COUNTERS, now)])
                if action.exit:
                    self.exited.add(name)

    def _train(self, name: str, action: Train, now: float) -> None:
        """What AgentService does, with a fake training step: the segment and running statistics move by 1."""
        task, machine, cache = action.task, self.machines[name], self.caches[name]
        if self.wipe_before.get(task.hop) == name:
            cache.wipe()
        try:
            loaded = load_model(action.received.take(), task, action.layout, cache, action.trial_id)
        except BaseMismatch as exc:
            self._apply(name, machine.base_missing(task.hop, action.received.src, exc.message, now), now)
            return
        after = {k: v + 1.0 if k in task.tensors or k.endswith(".stat") else v for k, v in loaded.tensors.items()}
        out = hand_on(
            task, after, loaded.versions, loaded.digests, action.layout, action.compression, cache, action.trial_id
        )
        res = HopResult(task, out.data, out.checkpoint, TrainStats(0.5, 1, 8, 0.0), EvalStats(0.4, 0.9, 2), 3)
        self.history.append((task.hop, dict(loaded.tensors), after, task.tensors))
        self._apply(name, machine.hop_trained(res, COUNTERS, now), now)

    def model_transfers(self) -> list[tuple[str, dict, int]]:
        """(receiver, meta, payload size) of every model transfer, in order."""
        out = []
        for _topic, payload in self.broker.published:
            env = decode(payload) if payload[:4] == b"SNK1" else None
            if env and env.body["purpose"] == "model" and env.body["seq"] == 0:
                out.append((env.dst, env.body["meta"], env.body["size"]))
        return out


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_every_segment_trains_once_per_agent_and_round(mode: str) -> None:
    h = Harness(agents=3, rounds=2, mode=mode)
    h.run()
    assert h.ctl.failed is None
    final = decode_tensors(h.ctl.final_model or b"")
    assert len(h.ctl.done_hops) == 6
    # every hop bumped exactly its segment's tensors by 1: the final model is initial + per-segment hop count
    plan = h.ctl.plan
    assert plan is not None
    for seg in plan.segments:
        times = sum(1 for hop in plan.hops if hop.segment == seg.index)
        for name in seg.params:
            np.testing.assert_array_equal(final[name], h.initial[name] + times)
    for name in final:  # every hop updated every running statistic once
        if name.endswith(".stat"):
            np.testing.assert_array_equal(final[name], h.initial[name] + len(plan.hops))


def test_each_model_handed_on_differs_from_the_received_one_only_in_the_segment() -> None:
    h = Harness(agents=2, rounds=2)
    h.run()
    assert h.ctl.failed is None
    models = [decode_tensors(h.ctl.setup.initial_model)]
    for _topic, payload in h.broker.published:  # every distinct model that travelled, in hop order
        env = decode(payload) if payload[:4] == b"SNK1" else None
        if env and env.body["purpose"] == "model" and env.body["seq"] == 0 and env.body["meta"]["hop"] > 0:
            sent, header = decode_model(env.data or b"")  # a delta: the groups it leaves out did not change
            assert header is not None
            models.append({**models[-1], **sent})
    assert len(models) == 5
    plan = h.ctl.plan
    assert plan is not None
    for hop, (before, after) in zip(plan.hops, zip(models, models[1:], strict=False), strict=True):
        owned = set(plan.segments[hop.segment].tensors)
        for name in before:
            same = np.array_equal(before[name], after[name])
            assert same != (name in owned or name.endswith(".stat")), (hop, name)


def test_a_corrupted_chunk_is_requested_again_and_the_trial_completes() -> None:
    h = Harness(agents=2, rounds=1)
    state = {"done": False}

    def corrupt(topic: str, payload: bytes) -> list[bytes]:
        if payload[:4] == b"SNK1" and "agents/a1" in topic and not state["done"]:
            env = decode(payload)
            if env.body.get("purpose") == "model":
                state["done"] = True
                return [payload[:-1] + bytes([payload[-1] ^ 0xFF])]
        return [payload]

    h.broker.tamper = corrupt
    h.run()
    assert state["done"] and h.ctl.failed is None and h.ctl.final_model is not None
    nacks = [decode(p) for t, p in h.broker.published if p[:1] == b"{" and decode(p).type == "transfer_nack"]
    assert len(nacks) == 1 and nacks[0].src == "a1"


def test_duplicated_messages_change_nothing() -> None:
    ref = Harness(agents=2, rounds=2)
    ref.run()
    h = Harness(agents=2, rounds=2)
    h.broker.tamper = lambda topic, payload: [payload, payload]  # every publish delivered twice (QoS 1)
    h.run()
    assert h.ctl.failed is None
    assert len(h.history) == len(ref.history) == 4  # no hop trained twice
    a, b = decode_tensors(h.ctl.final_model or b""), decode_tensors(ref.ctl.final_model or b"")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_garbage_in_every_inbox_is_dropped_and_answered() -> None:
    h = Harness(agents=2, rounds=1)
    garbage = [
        b"",
        b"\x00\xff",
        b"{",
        b"[]",
        b'{"v": 99, "type": "hello"}',
        b"SNK1\x00\x00\x00\x05{}",
        b"SNK1\xff\xff\xff\xff",
    ]
    for payload in garbage:
        for topic in [topics.coordinator_inbox(), topics.agent_inbox("a0"), topics.agent_inbox("a1")]:
            h.broker.publish(topic, payload)
    h.run()
    assert h.ctl.failed is None and h.ctl.final_model is not None


def test_fedavg_trains_everything_everywhere_and_averages_by_samples() -> None:
    h = Harness(agents=3, rounds=2, algorithm="fedavg")
    for i, machine in enumerate(h.machines.values()):  # unequal data: 100, 200, 300 samples
        machine.hello = dataclasses.replace(machine.hello, num_train=100 * (i + 1))
    h.run()
    assert h.ctl.failed is None and len(h.ctl.done_hops) == 6
    final = decode_tensors(h.ctl.final_model or b"")
    for name in final:  # each round every agent adds 1 to every tensor: the average adds 1 per round
        np.testing.assert_allclose(final[name], h.initial[name] + 2, rtol=1e-6)


def test_fedavg_average_is_weighted_by_training_samples() -> None:
    strategy = FedAvgStrategy()
    strategy.samples = {"a": 100, "b": 300}
    merged = strategy.average({"a": {"w": np.zeros(2, np.float32)}, "b": {"w": np.full(2, 4.0, np.float32)}})
    np.testing.assert_allclose(merged["w"], [3.0, 3.0])


def test_a_stale_shutdown_from_another_trial_does_not_stop_a_fresh_agent() -> None:
    h = Harness(agents=2, rounds=1)
    stale = Envelope("shutdown", "coordinator", "a0", {"reason": "old", "exit": True}, trial_id="old-trial")
    h.broker.publish(topics.agent_inbox("a0"), encode(stale))  # queued in a0's persistent session
    h.run()
    assert h.ctl.failed is None and h.ctl.final_model is not None  # a0 did not exit


@pytest.mark.parametrize(("algorithm", "mode"), [("snake", "p2p"), ("snake", "cs"), ("fedavg", "cs")])
def test_every_round_yields_one_checkpoint_for_evaluation(algorithm: str, mode: str) -> None:
    h = Harness(agents=2, rounds=3, mode=mode, algorithm=algorithm, checkpoints=True)
    h.run()
    assert h.ctl.failed is None
    assert sorted(r for r, _ in h.round_models) == [0, 1, 2]
    # only P2P needs extra copies (the last hop of rounds 0 and 1); the final model is the last round's
    assert (h.ctl.checkpoint_bytes > 0) == (mode == "p2p")


def full_size(h: Harness) -> int:
    return len(encode_tensors(h.initial))


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_later_hops_carry_only_the_groups_the_receiver_lacks(mode: str) -> None:
    h = Harness(agents=4, rounds=3, mode=mode)
    h.run()
    assert h.ctl.failed is None
    full = full_size(h)
    transfers = h.model_transfers()
    to_agents = [size for dst, meta, size in transfers if dst != "coordinator"]
    # P2P: the initial model and each agent's first visit are whole; once every agent holds a copy,
    # each hop sends only the 3 segments trained since the receiver's last hop (+ running statistics)
    assert all(size > 0.95 * full for size in to_agents[:4])
    assert all(size < 0.9 * full for size in to_agents[4:])
    if mode == "cs":  # every upload carries one segment
        uploads = [size for dst, meta, size in transfers if dst == "coordinator"][:-1]
        assert uploads and all(size < 0.6 * full for size in uploads)
    ref = Harness(agents=4, rounds=3, mode=mode)
    ref.run()
    final, expected = decode_tensors(h.ctl.final_model or b""), decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_a_lost_cached_copy_is_replaced_by_the_whole_model(mode: str) -> None:
    ref = Harness(agents=3, rounds=2, mode=mode)
    ref.run()
    h = Harness(agents=3, rounds=2, mode=mode)
    h.wipe_before = {3: "a0"}  # a0's copy of its hop-0 output is gone when hop 3's delta arrives
    h.run()
    assert h.ctl.failed is None
    requests = [decode(p) for _, p in h.broker.published if p[:1] == b"{" and decode(p).type == "model_request"]
    assert [(r.src, r.body["hop"]) for r in requests] == [("a0", 3)]
    to_a0 = [(meta["hop"], size) for dst, meta, size in h.model_transfers() if dst == "a0"]
    assert [hop for hop, _ in to_a0] == [0, 3, 3]  # hop 3: the delta, then the whole model
    assert to_a0[1][1] < to_a0[2][1]
    final, expected = decode_tensors(h.ctl.final_model or b""), decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


def test_a_cached_copy_that_differs_is_never_used() -> None:
    h = Harness(agents=2, rounds=2)
    original = h.caches["a0"].save

    def save_tampered(trial_id: str, hop: int, versions: dict, tensors: dict) -> None:
        original(trial_id, hop, versions, {k: v + (0.5 if k.endswith(".w") else 0.0) for k, v in tensors.items()})

    h.caches["a0"].save = save_tampered  # type: ignore[method-assign]
    h.run()
    assert h.ctl.failed is None
    requests = [decode(p) for _, p in h.broker.published if p[:1] == b"{" and decode(p).type == "model_request"]
    assert len(requests) == 1 and "digest" in requests[0].body["reason"]  # a0's hop 2 fetched the whole model
    final = decode_tensors(h.ctl.final_model or b"")
    ref = Harness(agents=2, rounds=2)
    ref.run()
    expected = decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


def test_fp16_compression_works_with_deltas() -> None:
    h = Harness(agents=3, rounds=2, compression="fp16")
    h.run()
    assert h.ctl.failed is None
    final = decode_tensors(h.ctl.final_model or b"")
    plan = h.ctl.plan
    assert plan is not None
    for seg in plan.segments:  # small integers survive fp16 exactly
        times = sum(1 for hop in plan.hops if hop.segment == seg.index)
        for name in seg.params:
            np.testing.assert_array_equal(final[name], h.initial[name] + times)
    later = [size for dst, meta, size in h.model_transfers() if dst != "coordinator"][3:]
    assert later and all(size < 0.5 * full_size(h) for size in later)  # fp16 and only the groups that changed


def test_fedavg_keeps_whole_transfers() -> None:
    h = Harness(agents=2, rounds=2, algorithm="fedavg")
    h.run()
    sizes = [size for _, _, size in h.model_transfers()]
    assert len(sizes) == 8 and all(size > 0.95 * full_size(h) for size in sizes)
