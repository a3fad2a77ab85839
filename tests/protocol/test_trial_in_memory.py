"""A whole trial, agents and coordinator state machines, in one thread over the in-memory broker."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from coordinator.controller import Controller, TrialSetup
from coordinator.scheduler import GroupInfo, HopSettings, Plan, fedavg_plan, snake_plan, split_plan
from coordinator.split import SplitStrategy
from coordinator.strategy import FedAvgStrategy, SnakeStrategy, Strategy
from edge_agent.agent import Agent, Counters, Gradient, HopResult, SayBye, StoreArtifact, Train
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.messages import Hello
from edge_agent.protocol.split import encode_activations
from edge_agent.trainer import EvalStats, TrainStats
from tests.fakes import CountingBack, MemoryBroker

GROUPS = [GroupInfo(f"g{i}", (f"g{i}.w",), (f"g{i}.stat",), 10 * (i + 1)) for i in range(4)]
COUNTERS = Counters(0, 0, 1.0)
SPLIT_BATCHES = 3  # batches per split-learning hop in the harness


def hello(agent_id: str) -> Hello:
    return Hello(agent_id, "fake", {}, "x86_64", "Linux", "3.11", 2, 1024, 512, 100, 10, 10, [1, 28, 28], [10] * 10)


def fake_bundles(plan: Plan) -> tuple[dict[tuple[int, str], tuple[str, int]], dict[str, bytes]]:
    """One made-up bundle per segment of the plan, as the coordinator builds them once it has planned."""
    arts, blobs = {}, {}
    for seg in plan.segments:
        blob = f"bundle-{','.join(seg.groups)}".encode() * 1000
        sha = hashlib.sha256(blob).hexdigest()
        arts[seg.index, "ort"], blobs[sha] = (sha, len(blob)), blob
    return arts, blobs


@dataclass
class Harness:
    agents: int = 3
    rounds: int = 2
    mode: str = "p2p"
    algorithm: str = "snake"
    checkpoints: bool = False
    backends: tuple[str, ...] = ("fake",)
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    history: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial = {
            name: np.full(3, i, np.float32) for i, g in enumerate(GROUPS) for name in (*g.params, *g.buffers)
        }
        self.back = CountingBack(GROUPS[1:])
        plans = {
            "fedavg": lambda hellos: fedavg_plan(sorted(hellos), GROUPS, self.rounds),
            "split": lambda hellos: split_plan(sorted(hellos), GROUPS, self.rounds, "g0"),
            "snake": lambda hellos: snake_plan(sorted(hellos), GROUPS, self.rounds, self.mode),
        }
        strategies: dict[str, Strategy] = {
            "fedavg": FedAvgStrategy(),
            "split": SplitStrategy(self.back),
            "snake": SnakeStrategy(),
        }
        setup = TrialSetup(
            "t1", self.agents, plans[self.algorithm], {}, {}, encode_tensors(self.initial),
            HopSettings(1, 8, 0.1, 0, None, self.checkpoints), 4096, "none", 60.0, 60.0, strategies[self.algorithm],
            fake_bundles,
        )  # fmt: skip
        self.ctl = Controller(setup, 0.0)
        self.broker.subscribe("coordinator", topics.coordinator_inbox())
        self.broker.subscribe("coordinator", topics.ALL_AGENT_STATUS)
        self.machines = {
            f"a{i}": Agent(
                dataclasses.replace(hello(f"a{i}"), backend=self.backends[i % len(self.backends)]), set(), 4096
            )
            for i in range(self.agents)
        }
        self.split_work: dict[str, tuple[Train, int]] = {}  # agent -> (its split hop, next batch)
        self.gradients: list[tuple[int, int, float]] = []  # (hop, seq, loss) as the agents received them
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
            elif isinstance(action, Train) and action.task.split:
                self.split_work[name] = (action, 0)
                self._send_batch(name, now)
            elif isinstance(action, Gradient):
                self._on_gradient(name, action, now)
            elif isinstance(action, Train):
                task = action.task
                after = {k: v.copy() for k, v in action.tensors.items()}
                for t in after:  # the segment trains, running statistics follow the data, the rest must not leak
                    after[t] = after[t] + (1.0 if t in task.tensors or t.endswith(".stat") else 100.0)
                updated = frozenset(task.tensors) | {t for t in after if t.endswith(".stat")}
                res = HopResult(task, after, updated, TrainStats(0.5, 1, 8, 0.0), EvalStats(0.4, 0.9, 2), 3)
                self.history.append((task.hop, action.tensors, after, task.tensors))
                self._apply(name, machine.hop_trained(res, COUNTERS, now), now)
            elif isinstance(action, SayBye):
                self._publish([machine.bye(COUNTERS, now)])
                if action.exit:
                    self.exited.add(name)

    # -- a split-learning worker: sends SPLIT_BATCHES batches, adds 1 to the front per gradient ------
    def _send_batch(self, name: str, now: float) -> None:
        action, seq = self.split_work[name]
        activations = np.full((2, 3), seq + 10 * action.task.hop, np.float32)
        data = encode_activations(activations, np.array([1, 3]))
        self._apply(name, self.machines[name].send_activations(action.task.hop, seq, data, now), now)

    def _on_gradient(self, name: str, grad: Gradient, now: float) -> None:
        action, seq = self.split_work[name]
        assert (grad.hop, grad.seq) == (action.task.hop, seq)  # exactly the batch the worker waits for
        np.testing.assert_array_equal(grad.gradient, -np.full((2, 3), seq + 10 * grad.hop, np.float32))
        self.gradients.append((grad.hop, grad.seq, grad.loss))
        if seq + 1 < SPLIT_BATCHES:
            self.split_work[name] = (action, seq + 1)
            self._send_batch(name, now)
            return
        del self.split_work[name]
        task = action.task
        after = {k: v + SPLIT_BATCHES for k, v in action.tensors.items()}
        res = HopResult(task, after, frozenset(task.tensors), TrainStats(grad.loss, SPLIT_BATCHES, 6, 0.0),
                        EvalStats(float("nan"), float("nan"), 0), 3)  # fmt: skip
        self.history.append((task.hop, action.tensors, after, task.tensors))
        self._apply(name, self.machines[name].hop_trained(res, COUNTERS, now), now)


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
            models.append(decode_tensors(env.data or b""))
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


@pytest.mark.parametrize("duplicate", [False, True])
def test_split_learning_trains_the_front_on_agents_and_the_back_per_batch(duplicate: bool) -> None:
    h = Harness(agents=2, rounds=2, algorithm="split", checkpoints=True)
    if duplicate:
        h.broker.tamper = lambda topic, payload: [payload, payload]  # every publish delivered twice (QoS 1)
    h.run()
    assert h.ctl.failed is None and len(h.ctl.done_hops) == 4
    total = 4 * SPLIT_BATCHES
    assert h.back.steps == total  # one back step per batch, duplicates or not
    assert [(hop, seq) for hop, seq, _ in h.gradients] == [(hop, s) for hop in range(4) for s in range(SPLIT_BATCHES)]
    assert all(loss == 2.0 for _, _, loss in h.gradients)  # the coordinator's loss reached the agent
    final = decode_tensors(h.ctl.final_model or b"")
    assert set(final) == set(h.initial)  # front + back assembled
    for name in ("g0.w", "g0.stat"):  # the front: +1 per batch on every hop, carried agent to agent
        np.testing.assert_array_equal(final[name], h.initial[name] + total)
    for name in ("g1.w", "g3.stat"):  # the back: the coordinator's, +1 per batch
        np.testing.assert_array_equal(final[name], np.full(3, total, np.float32))
    assert sorted(r for r, _ in h.round_models) == [0, 1]  # one assembled model per round for evaluation
    # only the front travels to agents; activations and gradients were counted
    for _topic, payload in h.broker.published:
        env = decode(payload) if payload[:4] == b"SNK1" else None
        if env and env.body["purpose"] == "model":
            assert set(decode_tensors(env.data or b"")) == {"g0.w", "g0.stat"}
    assert h.ctl.activation_bytes == total * len(encode_activations(np.zeros((2, 3), np.float32), np.array([1, 3])))
    assert h.ctl.gradient_bytes > 0


@pytest.mark.expect_errors
def test_split_learning_refuses_a_portable_agent_by_name() -> None:
    h = Harness(agents=2, rounds=1, algorithm="split", backends=("fake", "portable"))
    h.run()
    assert h.ctl.failed is not None
    assert "a1 (portable)" in h.ctl.failed and "needs the ort backend" in h.ctl.failed
