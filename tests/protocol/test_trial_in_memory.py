"""A whole trial, agents and coordinator state machines, in one thread over the in-memory broker."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from coordinator.controller import Controller, TrialSetup
from coordinator.plan import GroupInfo, Plan
from coordinator.scheduler import HopSettings, fedavg_plan, snake_plan, split_plan
from coordinator.split import SplitStrategy
from coordinator.strategy import FedAvgStrategy, SnakeStrategy, Strategy
from edge_agent.actions import Counters, Gradient, HopResult, ResendFull, SayBye, StoreArtifact, Train
from edge_agent.agent import Agent
from edge_agent.handover import full_model, hand_on, load_model
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.delta import BaseMismatch, decode_model, newer
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.messages import Hello, to_body
from edge_agent.protocol.split import encode_activations
from edge_agent.trainer import EvalStats, TrainStats
from tests.fakes import CountingBack, MemoryBroker, MemoryModelCache

GROUPS = [GroupInfo(f"g{i}", (f"g{i}.w",), (f"g{i}.stat",), 10 * (i + 1)) for i in range(4)]
SIZE = 1024  # floats per tensor: parameters dominate the bytes, as in a real model
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
    compression: str = "none"
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    history: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial = {
            name: np.full(SIZE if name.endswith(".w") else 2, i, np.float32)
            for i, g in enumerate(GROUPS)
            for name in (*g.params, *g.buffers)
        }
        self.back = CountingBack(GROUPS[1:])
        plans = {
            "fedavg": lambda hellos: fedavg_plan(sorted(hellos), GROUPS, self.rounds),
            "split": lambda hellos: split_plan(sorted(hellos), GROUPS, self.rounds, "g0"),
            "snake": lambda hellos: snake_plan(sorted(hellos), GROUPS, self.rounds, self.mode),
        }
        strategies: dict[str, Strategy] = {
            "fedavg": FedAvgStrategy(self.compression),
            "split": SplitStrategy(self.back, self.compression),
            "snake": SnakeStrategy(self.compression),
        }
        setup = TrialSetup(
            "t1", self.agents, plans[self.algorithm], {}, {}, encode_tensors(self.initial),
            HopSettings(1, 8, 0.1, 0, None, self.checkpoints), 1 << 16, self.compression, 60.0, 60.0,
            strategies[self.algorithm], fake_bundles,
        )  # fmt: skip
        self.ctl = Controller(setup, 0.0)
        self.broker.subscribe("coordinator", topics.coordinator_inbox())
        self.broker.subscribe("coordinator", topics.ALL_AGENT_STATUS)
        self.machines = {
            f"a{i}": Agent(
                dataclasses.replace(hello(f"a{i}"), backend=self.backends[i % len(self.backends)]), set(), 1 << 16
            )
            for i in range(self.agents)
        }
        self.split_work: dict[str, tuple[Train, int]] = {}  # agent -> (its split hop, next batch)
        self.gradients: list[tuple[int, int, float]] = []  # (hop, seq, loss) as the agents received them
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
            elif isinstance(action, Train) and action.task.split:
                self.split_work[name] = (action, 0)
                self._send_batch(name, now)
            elif isinstance(action, Gradient):
                self._on_gradient(name, action, now)
            elif isinstance(action, Train):
                self._train(name, action, now)
            elif isinstance(action, ResendFull):
                try:  # as AgentService._resend
                    data = full_model(
                        self.caches[name], action.trial_id, action.hop - 1, action.layout, action.compression
                    )
                except BaseMismatch as exc:
                    self._apply(name, machine.resend(action.dst, action.hop, None, exc.message, now), now)
                else:
                    self._apply(name, machine.resend(action.dst, action.hop, data, "", now), now)
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
        task, cache = action.task, self.caches[name]
        loaded = load_model(action.received.take(), task, action.layout, cache, action.trial_id)
        after = {k: v + SPLIT_BATCHES for k, v in loaded.tensors.items()}
        out = hand_on(
            task, after, loaded.versions, loaded.digests, action.layout, action.compression, cache, action.trial_id
        )
        res = HopResult(task, out.data, out.checkpoint, TrainStats(grad.loss, SPLIT_BATCHES, 6, 0.0),
                        EvalStats(float("nan"), float("nan"), 0), 3)  # fmt: skip
        self.history.append((task.hop, dict(loaded.tensors), after, task.tensors))
        self._apply(name, self.machines[name].hop_trained(res, COUNTERS, now), now)

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


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_each_model_handed_on_differs_from_the_received_one_only_in_the_segment(mode: str) -> None:
    """Whatever travelled (a delta or the whole model), each hop starts from exactly the model the previous
    hop produced, and changes only its own segment and the running statistics."""
    h = Harness(agents=3, rounds=2, mode=mode)
    h.run()
    assert h.ctl.failed is None
    plan = h.ctl.plan
    assert plan is not None
    history = sorted(h.history, key=lambda entry: entry[0])
    assert [hop for hop, *_ in history] == [hop.hop for hop in plan.hops]
    previous = decode_tensors(h.ctl.setup.initial_model)
    for hop, (_, before, after, _) in zip(plan.hops, history, strict=True):
        assert before.keys() == previous.keys() and all(np.array_equal(before[k], previous[k]) for k in before), hop
        owned = set(plan.segments[hop.segment].tensors)
        for name in before:
            same = np.array_equal(before[name], after[name])
            assert same != (name in owned or name.endswith(".stat")), (hop, name)
        previous = after
    final = decode_tensors(h.ctl.final_model or b"")
    assert all(np.array_equal(final[k], previous[k]) for k in previous)


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


def full_size(h: Harness) -> int:
    return len(encode_tensors(h.initial))


def headers_sent(h: Harness) -> list[tuple[str, int, tuple[str, ...]]]:
    """(receiver, hop, groups sent) of every model transfer, in order."""
    out = []
    for _topic, payload in h.broker.published:
        env = decode(payload) if payload[:4] == b"SNK1" else None
        if env and env.body["purpose"] == "model" and env.body["seq"] == 0:
            _, header = decode_model(env.data or b"")  # one chunk: the harness's chunks hold a whole model
            assert header is not None
            out.append((env.dst, env.body["meta"]["hop"], header.sent))
    return out


def first_delta(h: Harness, from_itself: bool = False) -> tuple[int, str]:
    """The first hop (and its agent) whose model arrives as a delta against the agent's cached copy,
    sent by another agent (or, with ``from_itself``, by the same agent: it trains twice in a row)."""
    plan = h.ctl.plan
    assert plan is not None
    hop = next(
        p for p in plan.hops[1:] if plan.held_by(p.hop) and (plan.hops[p.hop - 1].agent == p.agent) == from_itself
    )
    return hop.hop, hop.agent


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_later_hops_carry_only_the_groups_the_receiver_lacks(mode: str) -> None:
    h = Harness(agents=4, rounds=3, mode=mode)
    h.run()
    assert h.ctl.failed is None
    plan = h.ctl.plan
    assert plan is not None
    groups = [g for g, _ in plan.layout]
    for dst, hop, sent in headers_sent(h):
        if dst == "coordinator" and mode == "cs":  # an upload carries the agent's own segment
            expected = list(plan.segments[plan.hops[hop - 1].segment].groups)
        elif dst == "coordinator":  # the last P2P hop: the coordinator holds nothing of this trial
            expected = groups
        else:  # what was trained since the receiver's cached copy (everything on its first visit)
            expected = newer(plan.versions_after(hop - 1), plan.held_by(hop)) if hop else groups
        assert list(sent) == expected, (dst, hop)
    full = full_size(h)
    sizes = [size for dst, _, size in h.model_transfers() if dst != "coordinator"]
    assert sum(size < 0.9 * full for size in sizes) >= 4  # this plan: 6 of 12 hops need at most half the model
    ref = Harness(agents=4, rounds=3, mode=mode)
    ref.run()
    final, expected = decode_tensors(h.ctl.final_model or b""), decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_a_lost_cached_copy_is_replaced_by_the_whole_model(mode: str) -> None:
    ref = Harness(agents=3, rounds=2, mode=mode)
    ref.run()
    hop, agent = first_delta(ref)
    h = Harness(agents=3, rounds=2, mode=mode)
    h.wipe_before = {hop: agent}  # the agent's cached copy is gone when the delta for ``hop`` arrives
    h.run()
    assert h.ctl.failed is None
    requests = [decode(p) for _, p in h.broker.published if p[:1] == b"{" and decode(p).type == "model_request"]
    assert [(r.src, r.body["hop"]) for r in requests] == [(agent, hop)]
    to_agent = [(meta["hop"], size) for dst, meta, size in h.model_transfers() if dst == agent]
    assert [size for h_, size in to_agent if h_ == hop][0] < [size for h_, size in to_agent if h_ == hop][1]
    assert len([h_ for h_, _ in to_agent if h_ == hop]) == 2  # the delta, then the whole model
    final, expected = decode_tensors(h.ctl.final_model or b""), decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


def tamper_cache(h: Harness, agent: str) -> None:
    """``agent``'s cache keeps something other than the model it handed on."""
    original = h.caches[agent].save

    def save_tampered(trial_id: str, hop: int, versions: dict, tensors: dict, digest: str) -> None:
        original(
            trial_id, hop, versions, {k: v + (0.5 if k.endswith(".w") else 0.0) for k, v in tensors.items()}, digest
        )

    h.caches[agent].save = save_tampered  # type: ignore[method-assign]


def test_a_cached_copy_that_differs_is_never_used() -> None:
    ref = Harness(agents=3, rounds=2)
    ref.run()
    hop, agent = first_delta(ref)
    h = Harness(agents=3, rounds=2)
    tamper_cache(h, agent)
    h.run()
    assert h.ctl.failed is None
    requests = [decode(p) for _, p in h.broker.published if p[:1] == b"{" and decode(p).type == "model_request"]
    assert [(r.src, r.body["hop"]) for r in requests] == [(agent, hop)]
    assert "digest" in requests[0].body["reason"]  # it fetched the whole model
    final = decode_tensors(h.ctl.final_model or b"")
    expected = decode_tensors(ref.ctl.final_model or b"")
    assert all(np.array_equal(final[k], expected[k]) for k in expected)


@pytest.mark.expect_errors
def test_a_damaged_copy_is_never_resent() -> None:
    """An agent that trains twice in a row is its own sender: with its only copy damaged, the trial fails
    with the reason instead of training on a model nobody trained."""
    ref = Harness(agents=2, rounds=2)
    ref.run()
    hop, agent = first_delta(ref, from_itself=True)
    h = Harness(agents=2, rounds=2)
    tamper_cache(h, agent)
    h.run()
    assert h.ctl.failed is not None
    assert f"cannot resend the model for hop {hop}" in h.ctl.failed and "damaged" in h.ctl.failed
    assert len(h.history) == hop  # nothing trained on the damaged copy


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
    to_agents = [(meta["hop"], size) for dst, meta, size in h.model_transfers() if dst != "coordinator"]
    to_agents = [(hop, size) for hop, size in to_agents if hop > 0]  # the initial model travels as float32
    full = full_size(h)
    assert all(size < 0.55 * full for _, size in to_agents)  # fp16: half of float32 at most
    groups = len(plan.layout)
    deltas = [size for hop, size in to_agents if len(newer(plan.versions_after(hop - 1), plan.held_by(hop))) < groups]
    assert deltas and all(size < 0.4 * full for size in deltas)  # fp16 and only the groups that changed


def test_fedavg_keeps_whole_transfers() -> None:
    h = Harness(agents=2, rounds=2, algorithm="fedavg")
    h.run()
    sizes = [size for _, _, size in h.model_transfers()]
    assert len(sizes) == 8 and all(size > 0.95 * full_size(h) for size in sizes)


def test_a_repeated_hello_is_answered_quietly_and_a_restarted_agent_is_reported() -> None:
    h = Harness(agents=2)

    def say_hello(agent: str, instance: str, now: float) -> tuple[list[str], list[str]]:
        body = to_body(dataclasses.replace(hello(agent), instance=instance))
        step = h.ctl.handle(topics.coordinator_inbox(), encode(Envelope("hello", agent, topics.COORDINATOR, body)), now)
        return [decode(o.payload).type for o in step.out], [e.kind for e in step.events]

    say_hello("a0", "first-a0", 0.0)
    say_hello("a1", "first-a1", 0.1)
    assert h.ctl.plan is not None
    # agents repeat their hello every few seconds until the assignment arrives (artifacts take a while)
    sent, events = say_hello("a0", "first-a0", 3.0)
    assert "assign" in sent and "warning" not in events
    sent, events = say_hello("a0", "second-a0", 9.0)  # the agent process restarted
    assert "assign" in sent and "warning" in events
