"""Split learning's wire pieces and pure logic: payloads, batch metas, the agent's and the coordinator's
handling of activations and gradients (duplicates, reordering, garbage). No torch, no broker."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from coordinator.events import Stepped
from coordinator.plan import Plan
from coordinator.scheduler import cut_segments, split_plan
from coordinator.split import SplitStrategy
from coordinator.strategy import ModelSend
from edge_agent.actions import Gradient, Train
from edge_agent.agent import Agent
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.messages import Assign, HopTask, to_body
from edge_agent.protocol.split import (
    ACTIVATIONS,
    GRADIENTS,
    decode_activations,
    decode_gradient,
    encode_activations,
    encode_gradient,
    parse_batch,
)
from edge_agent.protocol.transfer import Completed, Outbox, Reassembler
from tests.protocol.trial_bed import GROUPS, hello
from tools.fakes import CountingBack

A = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2) / 7
LABELS = np.array([3, 9])
ACTIVATIONS_SHA256 = "fb4aacef29db3068f57c0091799c7186b3bc1932286b6f53676f4e983fe25ba0"
GRADIENT_SHA256 = "381cce3f3d681c2cd75c0e295db8657c9487e185768db543e05d66ac17036e2c"


def test_activation_payload_golden_round_trip() -> None:
    data = encode_activations(A, LABELS)
    # safetensors of two float32 tensors: the exact bytes are part of the protocol (golden digest)
    assert hashlib.sha256(data).hexdigest() == ACTIVATIONS_SHA256
    activations, labels = decode_activations(data)
    np.testing.assert_array_equal(activations, A)
    assert labels.dtype == np.int64 and labels.tolist() == [3, 9]
    half, _ = decode_activations(encode_activations(A, LABELS, "fp16"))  # compression applies to activations too
    np.testing.assert_allclose(half, A, atol=1e-3)
    assert len(encode_activations(A, LABELS, "fp16")) < len(data)


def test_gradient_payload_golden_round_trip() -> None:
    data = encode_gradient(-A)
    assert hashlib.sha256(data).hexdigest() == GRADIENT_SHA256
    np.testing.assert_array_equal(decode_gradient(data), -A)


@pytest.mark.parametrize(
    "payload",
    [
        b"not safetensors",
        encode_tensors({"activations": A}),  # no labels
        encode_tensors({"activations": A, "labels": np.array([0.5, 1], np.float32)}),  # labels not integers
        encode_tensors({"activations": A, "labels": np.array([1, 2, 3], np.float32)}),  # count differs
        encode_tensors({"activations": A * np.nan, "labels": np.array([1, 2], np.float32)}),
    ],
)
def test_malformed_activation_payloads_are_refused_with_a_reason(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_activations(payload)
    assert err.value.code == "malformed"


@pytest.mark.parametrize(
    "meta", [{}, {"hop": 1}, {"hop": "1", "seq": 0}, {"hop": 1, "seq": -1}, {"hop": True, "seq": 0}]
)
def test_batch_meta_must_name_hop_and_seq(meta: dict) -> None:
    with pytest.raises(ProtocolError):
        parse_batch(meta)
    assert parse_batch({"hop": 2, "seq": 5, "round": 0}) == (2, 5)


def test_cut_segments_and_split_plan() -> None:
    front, back = cut_segments(GROUPS, "g1")
    assert front.groups == ("g0", "g1") and back.groups == ("g2", "g3")
    assert front.tensors == ("g0.w", "g0.stat", "g1.w", "g1.stat")
    plan = split_plan(["a", "b"], GROUPS, 2, "g0")
    assert plan.algorithm == "split" and plan.mode == "cs"
    assert [(h.round, h.agent, h.segment) for h in plan.hops] == [(0, "a", 0), (0, "b", 0), (1, "a", 0), (1, "b", 0)]
    assert "the back, trained on the coordinator" in "\n".join(plan.describe())
    with pytest.raises(ValueError, match="choose one of: g0, g1, g2"):
        cut_segments(GROUPS, "g3")  # nothing would be left for the coordinator


def batch(hop: int, seq: int, src: str = "a", data: bytes | None = None) -> Completed:
    payload = encode_activations(A, LABELS) if data is None else data
    return Completed(f"t{hop}-{seq}-{src}", src, "t1", ACTIVATIONS, {"hop": hop, "seq": seq, "round": 0}, payload, "")


def answered(strategy: SplitStrategy, plan: Plan, back: CountingBack, done: Completed) -> list[ModelSend]:
    """What the coordinator sends for one batch: the strategy asks for a back step, the shell runs it."""
    decision = strategy.on_activations(plan, done)
    sends = list(decision.sends)
    for job in decision.jobs:
        gradient, loss = back.step(job.activations, job.labels)
        sends += strategy.on_stepped(plan, job, Stepped(gradient, loss)).sends
    return sends


def test_the_back_steps_once_per_batch_whatever_arrives() -> None:
    plan = split_plan(["a", "b"], GROUPS, 1, "g0")
    back = CountingBack(GROUPS[1:])
    strategy = SplitStrategy(back)
    strategy.start(
        plan, encode_tensors({t: np.zeros(3, np.float32) for g in GROUPS for t in (*g.params, *g.buffers)}), {}
    )
    first = answered(strategy, plan, back, batch(0, 0))
    assert len(first) == 1 and first[0].purpose == GRADIENTS and first[0].dst == "a"
    assert first[0].meta == {"hop": 0, "seq": 0, "loss": 6.0}
    np.testing.assert_array_equal(decode_gradient(first[0].data), -A)
    again = answered(strategy, plan, back, batch(0, 0))  # the agent asked again: same answer, no second step
    assert again == first and back.steps == 1
    answered(strategy, plan, back, batch(0, 1))
    assert answered(strategy, plan, back, batch(0, 0)) == [] and back.steps == 2  # older than the last: dropped
    assert answered(strategy, plan, back, batch(1, 0, "b")) == []  # hop 1 has not started
    assert answered(strategy, plan, back, batch(0, 2, "b")) == []  # not hop 0's agent
    with pytest.raises(ProtocolError):
        strategy.on_activations(plan, batch(0, 3, data=b"garbage"))
    assert back.steps == 2


def test_a_round_ends_with_front_and_back_assembled() -> None:
    plan = split_plan(["a"], GROUPS, 1, "g0")
    back = CountingBack(GROUPS[1:])
    strategy = SplitStrategy(back)
    initial = {t: np.full(3, 5, np.float32) for g in GROUPS for t in (*g.params, *g.buffers)}
    (send,) = strategy.start(plan, encode_tensors(initial), {})
    assert set(decode_tensors(send.data)) == {"g0.w", "g0.stat"}  # only the front travels to agents
    answered(strategy, plan, back, batch(0, 0))
    front = {"g0.w": np.full(3, 7, np.float32), "g0.stat": np.full(3, 8, np.float32)}
    done = Completed("m", "a", "t1", "model", {"hop": 1, "from_hop": 0, "round": 0}, encode_tensors(front), "")
    decision = strategy.on_model(plan, done)
    assert decision.final is not None and decision.checkpoint is not None
    model = decode_tensors(decision.final)
    assert set(model) == set(initial)
    assert model["g0.w"][0] == 7 and model["g2.w"][0] == 1  # the agent's front, the back after one step


def split_task(hop: int = 0) -> HopTask:
    return HopTask(0, hop, 0, ["g0"], ["g0.w"], "sha", 1, "coordinator", "coordinator", 1, 2, 0.1, 0, split=True)


def gradient_frames(hop: int, seq: int, data: bytes | None = None, loss: object = 1.5) -> list:
    outbox = Outbox("coordinator")
    payload = encode_gradient(-A) if data is None else data
    _, out = outbox.send("a0", "t1", GRADIENTS, {"hop": hop, "seq": seq, "loss": loss}, payload, 4096, 0.0)
    return out


def training_agent() -> Agent:
    agent = Agent(hello("a0"), {"sha"}, 4096)
    assign = Envelope("assign", "coordinator", "a0", to_body(Assign([split_task()], 4096)), trial_id="t1")
    agent.handle("x", encode(assign), 0.0)
    model = Outbox("coordinator").send("a0", "t1", "model", {"hop": 0}, encode_tensors({"g0.w": A}), 4096, 0.0)[1]
    fx = agent.handle(model[0].topic, model[0].payload, 0.0)
    assert any(isinstance(a, Train) for a in fx.actions)
    return agent


def test_the_agent_hands_on_exactly_the_awaited_gradient_once(caplog: pytest.LogCaptureFixture) -> None:
    agent = training_agent()
    fx = agent.send_activations(0, 0, encode_activations(A, LABELS), 1.0)
    frames = [decode(o.payload) for o in fx.out]
    assert frames and all(f.body["purpose"] == ACTIVATIONS and f.body["meta"]["seq"] == 0 for f in frames)
    assert sum(len(f.data or b"") for f in frames) == len(encode_activations(A, LABELS))
    late = gradient_frames(0, 7)  # not awaited: dropped with a reason
    assert agent.handle(late[0].topic, late[0].payload, 1.0).actions == []
    assert "not awaited" in caplog.text
    good = gradient_frames(0, 0)
    actions = agent.handle(good[0].topic, good[0].payload, 1.0).actions
    assert len(actions) == 1 and isinstance(actions[0], Gradient) and actions[0].loss == 1.5
    np.testing.assert_array_equal(actions[0].gradient, -A)
    assert (
        agent.handle(good[0].topic, good[0].payload, 1.0).actions == []
    )  # QoS 1 duplicate: acknowledged, not delivered
    again = gradient_frames(0, 0)  # the coordinator answered twice (new transfer): no longer awaited
    assert agent.handle(again[0].topic, again[0].payload, 1.0).actions == []


@pytest.mark.parametrize("kind", ["payload", "loss"])
def test_a_malformed_gradient_is_refused_and_answered(kind: str) -> None:
    agent = training_agent()
    agent.send_activations(0, 0, encode_activations(A, LABELS), 1.0)
    frames = gradient_frames(0, 0, data=b"junk") if kind == "payload" else gradient_frames(0, 0, loss="high")
    fx = agent.handle(frames[0].topic, frames[0].payload, 1.0)
    replies = [decode(o.payload) for o in fx.out]
    assert fx.actions == [] and any(r.type == "error" and r.error["code"] == "malformed" for r in replies)
    good = gradient_frames(0, 0)  # still awaited: a correct answer goes through
    assert len(agent.handle(good[0].topic, good[0].payload, 1.0).actions) == 1


def test_activations_for_a_hop_not_training_are_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    agent = training_agent()
    assert agent.send_activations(3, 0, b"x", 1.0).out == []
    assert "not training here" in caplog.text


def test_reassembler_is_unchanged_for_the_new_purposes() -> None:
    outbox, inbox = Outbox("a0"), Reassembler("coordinator")
    data = encode_activations(np.zeros((64, 32, 14, 14), np.float32), np.zeros(64, int))
    _, out = outbox.send("coordinator", "t1", ACTIVATIONS, {"hop": 0, "seq": 0}, data, 1 << 20, 0.0)
    assert len(out) == 2  # a cnn batch (1.6 MB) is chunked under the 1 MiB limit
    done = [inbox.add(decode(o.payload), 0.0)[0] for o in out][-1]
    assert done is not None and done.data == data and done.purpose == ACTIVATIONS
