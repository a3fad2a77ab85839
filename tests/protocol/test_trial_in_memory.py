"""Whole trials with the real agent and coordinator services over the in-memory broker (tests/protocol/
trial_bed.py): fake trainers and jobs, everything else as deployed, faults injected by the broker."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.controller import Controller
from coordinator.events import BuildArtifacts, Joined, Warned
from coordinator.strategy import FedAvgStrategy
from edge_agent.memlink import Delivery, Faults
from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from edge_agent.protocol.delta import decode_model, newer
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.messages import to_body
from edge_agent.protocol.split import encode_activations
from tests.protocol.trial_bed import TrialBed, hello
from tools.fakes import SPLIT_BATCHES


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_every_segment_trains_once_per_agent_and_round(tmp_path: Path, mode: str) -> None:
    h = TrialBed(tmp_path, agents=3, rounds=2, mode=mode)
    h.run()
    assert h.ctl.failed is None
    final = h.final
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
def test_each_model_handed_on_differs_from_the_received_one_only_in_the_segment(tmp_path: Path, mode: str) -> None:
    """Whatever travelled (a delta or the whole model), each hop starts from exactly the model the previous
    hop produced, and changes only its own segment and the running statistics."""
    h = TrialBed(tmp_path, agents=3, rounds=2, mode=mode)
    h.run()
    assert h.ctl.failed is None
    plan = h.ctl.plan
    assert plan is not None
    assert len(h.log) == len(plan.hops)  # snake hops run one after another: the log is in hop order
    previous = h.initial
    for hop, trained in zip(plan.hops, h.log, strict=True):
        before, after = trained.before, trained.after
        assert before.keys() == previous.keys() and all(np.array_equal(before[k], previous[k]) for k in before), hop
        owned = set(plan.segments[hop.segment].params)
        assert set(trained.trainable) == owned
        for name in before:
            same = np.array_equal(before[name], after[name])
            assert same != (name in owned or name.endswith(".stat")), (hop, name)
        previous = after
    assert all(np.array_equal(h.final[k], previous[k]) for k in previous)


def test_services_report_joins_and_agents_say_bye(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=1)
    h.run()
    h.finish()
    assert sorted(e.agent for e in h.events if isinstance(e, Joined)) == ["a0", "a1"]
    assert set(h.ctl.byes) == {"a0", "a1"} and all(s.exit_reason for s in h.services.values())
    assert sum(b.hops for b in h.ctl.byes.values()) == 2


def test_a_corrupted_chunk_is_requested_again_and_the_trial_completes(tmp_path: Path) -> None:
    state = {"done": False}

    def corrupt(topic: str, payload: bytes) -> list[Delivery]:
        if payload[:4] == b"SNK1" and "agents/a1" in topic and not state["done"]:
            env = decode(payload)
            if env.body.get("purpose") == "model":
                state["done"] = True
                return [Delivery(payload[:-1] + bytes([payload[-1] ^ 0xFF]))]
        return [Delivery(payload)]

    h = TrialBed(tmp_path, agents=2, rounds=1, tamper=corrupt)
    h.run()
    assert state["done"] and h.ctl.failed is None and h.ctl.final_model is not None
    nacks = h.sent("transfer_nack")
    assert len(nacks) == 1 and nacks[0].src == "a1"


def drop_first(match: Callable[[Envelope], bool]) -> tuple[Callable[[str, bytes], list[Delivery]], list[Envelope]]:
    """A tamper that drops the first message ``match`` accepts (and records it)."""
    dropped: list[Envelope] = []

    def tamper(topic: str, payload: bytes) -> list[Delivery]:
        if not dropped and payload[:1] in (b"{", b"S"):
            env = decode(payload)
            if match(env):
                dropped.append(env)
                return []
        return [Delivery(payload)]

    return tamper, dropped


def test_a_dropped_chunk_stalls_the_transfer_then_a_nack_names_it_and_it_is_resent(tmp_path: Path) -> None:
    ref = TrialBed(tmp_path / "ref", agents=2, rounds=1, chunk_bytes=4096)
    ref.run()
    tamper, dropped = drop_first(
        lambda e: e.type == "chunk" and e.dst == "a1" and e.body["purpose"] == "model" and e.body["seq"] == 2
    )
    h = TrialBed(tmp_path / "h", agents=2, rounds=1, chunk_bytes=4096, tamper=tamper)
    h.run()
    assert dropped and h.ctl.failed is None
    nacks = [n for n in h.sent("transfer_nack") if n.body["transfer_id"] == dropped[0].body["transfer_id"]]
    assert [(n.src, n.body["missing"], n.body["reason"]) for n in nacks] == [("a1", [2], "chunks missing")]
    resent = [f for f in h.frames("model") if f.body["transfer_id"] == dropped[0].body["transfer_id"]]
    assert [f.body["seq"] for f in resent].count(2) == 2  # sent, dropped, asked for, sent again
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


def test_a_dropped_ack_makes_the_sender_resend_and_the_receiver_acknowledge_again(tmp_path: Path) -> None:
    tamper, dropped = drop_first(lambda e: e.type == "transfer_ack" and (e.src, e.dst) == ("a1", "a0"))
    h = TrialBed(tmp_path, agents=2, rounds=1, tamper=tamper)
    h.run()
    assert dropped and h.ctl.failed is None
    ended = h.clock.now
    tid = dropped[0].body["transfer_id"]
    h.run(until=lambda: h.clock.now > ended + 120)  # a0 still waits for its ack
    frames = [f for f in h.frames("model") if f.body["transfer_id"] == tid]
    assert len(frames) == frames[0].body["count"] + 1  # sent whole, then one chunk as a probe
    acks = [a for a in h.sent("transfer_ack") if a.body["transfer_id"] == tid]
    assert len(acks) == 2  # the duplicate was acknowledged again, not delivered twice
    assert len(h.log) == 2 and not h.services["a0"].agent.outbox.pending  # nothing trained twice; a0 is done


@pytest.mark.parametrize("seed", [1, 2])
def test_random_drops_delays_and_reordering_change_nothing(tmp_path: Path, seed: int) -> None:
    ref = TrialBed(tmp_path / "ref", agents=3, rounds=2, chunk_bytes=4096)
    ref.run()
    faults = Faults(seed=seed, drop=0.03, duplicate=0.05, delay_s=(0.0, 0.3), reorder=0.2, reorder_s=1.0)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, chunk_bytes=4096, tamper=faults)
    h.run()
    assert h.ctl.failed is None, h.ctl.failed
    assert faults.counts.get("dropped", 0) >= 3 and faults.counts.get("reordered", 0) >= 10, faults.counts
    assert len(h.log) == len(ref.log) == 6  # no hop trained twice
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


@pytest.mark.expect_errors
def test_a_transfer_that_never_completes_fails_the_trial_with_the_reason(tmp_path: Path) -> None:
    def black_hole(topic: str, payload: bytes) -> list[Delivery]:  # a1 never gets a model
        if payload[:4] == b"SNK1" and topic == topics.agent_inbox("a1") and decode(payload).body["purpose"] == "model":
            return []
        return [Delivery(payload)]

    h = TrialBed(tmp_path, agents=2, rounds=1, hop_timeout_s=3600.0, tamper=black_hole)
    h.run()
    assert h.ctl.failed is not None and h.ctl.final_model is None
    assert "a1" in h.ctl.failed and "acknowledged model transfer" in h.ctl.failed, h.ctl.failed
    assert 150 < h.clock.now - 1_000 < 600  # it retried for minutes (simulated), then gave up


def test_duplicated_messages_change_nothing(tmp_path: Path) -> None:
    ref = TrialBed(tmp_path / "ref", agents=2, rounds=2)
    ref.run()
    h = TrialBed(tmp_path / "h", agents=2, rounds=2, tamper=lambda t, p: [Delivery(p), Delivery(p)])
    h.run()
    assert h.ctl.failed is None
    assert len(h.log) == len(ref.log) == 4  # no hop trained twice
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


def test_garbage_in_every_inbox_is_dropped_and_answered(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=1)
    garbage = [
        b"",
        b"\x00\xff",
        b"{",
        b"[]",
        b'{"v": 99, "type": "hello"}',
        b"SNK1\x00\x00\x00\x05{}",
        b"SNK1\xff\xff\xff\xff",
    ]
    h.coordinator.start()
    for service in h.services.values():
        service.start()
    for payload in garbage:
        for topic in [topics.coordinator_inbox(), topics.agent_inbox("a0"), topics.agent_inbox("a1")]:
            h.broker.publish(topic, payload)
    h.run()
    assert h.ctl.failed is None and h.ctl.final_model is not None


def test_fedavg_trains_everything_everywhere_and_averages_by_samples(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=3, rounds=2, algorithm="fedavg", samples=(100, 200, 300))
    h.run()
    assert h.ctl.failed is None and len(h.ctl.done_hops) == 6
    assert [h.ctl.hellos[a].num_train for a in ("a0", "a1", "a2")] == [100, 200, 300]
    for name, value in h.final.items():  # each round every agent adds 1 to every tensor: the average adds 1 per round
        np.testing.assert_allclose(value, h.initial[name] + 2, rtol=1e-6)


def test_fedavg_average_is_weighted_by_training_samples() -> None:
    strategy = FedAvgStrategy()
    strategy.samples = {"a": 100, "b": 300}
    merged = strategy.average({"a": {"w": np.zeros(2, np.float32)}, "b": {"w": np.full(2, 4.0, np.float32)}})
    np.testing.assert_allclose(merged["w"], [3.0, 3.0])


def test_fedavg_average_does_not_depend_on_the_order_models_arrive_in() -> None:
    strategy = FedAvgStrategy()
    strategy.samples = {"a": 1, "b": 1, "c": 1}
    big, one = np.full(2, 1e20, np.float32), np.ones(2, np.float32)
    models = {"a": {"w": big}, "b": {"w": one}, "c": {"w": -big}}  # a float sum of these depends on its order
    merged = [strategy.average({k: models[k] for k in order})["w"] for order in ("abc", "acb", "cba", "bca")]
    assert all(m.tobytes() == merged[0].tobytes() for m in merged)


def test_a_stale_shutdown_from_another_trial_does_not_stop_a_fresh_agent(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=1)
    stale = Envelope("shutdown", "coordinator", "a0", {"reason": "old", "exit": True}, trial_id="old-trial")
    h.broker.connect("agent-a0", clean=False, will=None)  # a0's persistent session holds it while a0 is down
    h.broker.subscribe("agent-a0", topics.agent_inbox("a0"))
    h.broker.disconnect("agent-a0")
    h.broker.publish(topics.agent_inbox("a0"), encode(stale))
    h.run()
    assert h.ctl.failed is None and h.ctl.final_model is not None  # a0 did not exit
    assert h.services["a0"].exit_reason is None


@pytest.mark.parametrize(("algorithm", "mode"), [("snake", "p2p"), ("snake", "cs"), ("fedavg", "cs")])
def test_every_round_yields_one_model_for_evaluation(tmp_path: Path, algorithm: str, mode: str) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=3, mode=mode, algorithm=algorithm, checkpoints=True)
    h.run()
    assert h.ctl.failed is None
    assert sorted(h.round_models()) == [0, 1, 2] and sorted(h.jobs.evaluated) == [0, 1, 2]
    # only P2P needs extra copies (the last hop of rounds 0 and 1); the final model is the last round's
    assert (h.ctl.checkpoint_bytes > 0) == (mode == "p2p")


@pytest.mark.parametrize("duplicate", [False, True])
def test_split_learning_trains_the_front_on_agents_and_the_back_per_batch(tmp_path: Path, duplicate: bool) -> None:
    tamper = (lambda t, p: [Delivery(p), Delivery(p)]) if duplicate else None  # every publish delivered twice
    h = TrialBed(tmp_path, agents=2, rounds=2, algorithm="split", checkpoints=True, tamper=tamper)
    h.run()
    assert h.ctl.failed is None and len(h.ctl.done_hops) == 4
    total = 4 * SPLIT_BATCHES
    assert h.back.steps == total  # one back step per batch, duplicates or not
    gradients = [(f.body["meta"]["hop"], f.body["meta"]["seq"]) for f in h.frames("gradients") if f.body["seq"] == 0]
    assert sorted(set(gradients)) == [(hop, s) for hop in range(4) for s in range(SPLIT_BATCHES)]
    assert h.losses == [2.0] * total  # the coordinator's loss reached the agent, once per batch
    final = h.final
    assert set(final) == set(h.initial)  # front + back assembled
    for name in ("g0.w", "g0.stat"):  # the front: +1 per batch on every hop, carried agent to agent
        np.testing.assert_array_equal(final[name], h.initial[name] + total)
    for name in ("g1.w", "g3.stat"):  # the back: the coordinator's, +1 per batch
        np.testing.assert_array_equal(final[name], np.full(3, total, np.float32))
    assert sorted(h.round_models()) == [0, 1]  # one assembled model per round for evaluation
    for env in h.frames("model"):  # only the front travels to agents
        assert set(decode_tensors(env.data or b"")) == {"g0.w", "g0.stat"}
    assert h.ctl.activation_bytes == total * len(encode_activations(np.zeros((2, 3), np.float32), np.array([1, 3])))
    assert h.ctl.gradient_bytes > 0


@pytest.mark.expect_errors
def test_split_learning_refuses_a_portable_agent_by_name(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=1, algorithm="split", backends=("fake", "portable"))
    h.run()
    assert h.ctl.failed is not None
    assert "a1 (portable)" in h.ctl.failed and "needs the ort backend" in h.ctl.failed


def full_size(h: TrialBed) -> int:
    return len(encode_tensors(h.initial))


def headers_sent(h: TrialBed) -> list[tuple[str, int, tuple[str, ...]]]:
    """(receiver, hop, groups sent) of every model transfer, in order."""
    out = []
    for env in h.frames("model"):
        if env.body["seq"] == 0:
            _, header = decode_model(env.data or b"")  # one chunk: the bed's chunks hold a whole model
            assert header is not None
            out.append((env.dst, env.body["meta"]["hop"], header.sent))
    return out


def first_delta(h: TrialBed, from_itself: bool = False) -> tuple[int, str]:
    """The first hop (and its agent) whose model arrives as a delta against the agent's cached copy,
    sent by another agent (or, with ``from_itself``, by the same agent: it trains twice in a row)."""
    plan = h.ctl.plan
    assert plan is not None
    hop = next(
        p for p in plan.hops[1:] if plan.held_by(p.hop) and (plan.hops[p.hop - 1].agent == p.agent) == from_itself
    )
    return hop.hop, hop.agent


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_later_hops_carry_only_the_groups_the_receiver_lacks(tmp_path: Path, mode: str) -> None:
    h = TrialBed(tmp_path / "h", agents=4, rounds=3, mode=mode)
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
    ref = TrialBed(tmp_path / "ref", agents=4, rounds=3, mode=mode)
    ref.run()
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


def wipe_when_model_arrives(h: TrialBed, hop: int, agent: str) -> None:
    """``agent``'s cached copy is lost while the model for ``hop`` is on its way to it."""

    def tamper(topic: str, payload: bytes) -> list[Delivery]:
        if payload[:4] == b"SNK1" and topic == topics.agent_inbox(agent):
            body = decode(payload).body
            if body["purpose"] == "model" and body["meta"].get("hop") == hop and body["seq"] == 0:
                h.caches[agent].wipe()
        return [Delivery(payload)]

    h.broker.tamper = tamper


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_a_lost_cached_copy_is_replaced_by_the_whole_model(tmp_path: Path, mode: str) -> None:
    ref = TrialBed(tmp_path / "ref", agents=3, rounds=2, mode=mode)
    ref.run()
    hop, agent = first_delta(ref)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, mode=mode)
    wipe_when_model_arrives(h, hop, agent)
    h.run()
    assert h.ctl.failed is None
    assert [(r.src, r.body["hop"]) for r in h.sent("model_request")] == [(agent, hop)]
    to_agent = [(meta["hop"], size) for dst, meta, size in h.model_transfers() if dst == agent]
    sizes = [size for h_, size in to_agent if h_ == hop]
    assert len(sizes) == 2 and sizes[0] < sizes[1]  # the delta, then the whole model
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


def tamper_cache(h: TrialBed, agent: str) -> None:
    """``agent``'s cache keeps something other than the model it handed on."""
    cache = h.caches[agent]
    original = cache.save

    def save_tampered(trial_id: str, hop: int, versions: dict, tensors: dict, digest: str) -> None:  # type: ignore[type-arg]
        original(
            trial_id, hop, versions, {k: v + (0.5 if k.endswith(".w") else 0.0) for k, v in tensors.items()}, digest
        )

    cache.save = save_tampered  # type: ignore[method-assign]


def test_a_cached_copy_that_differs_is_never_used(tmp_path: Path) -> None:
    ref = TrialBed(tmp_path / "ref", agents=3, rounds=2)
    ref.run()
    hop, agent = first_delta(ref)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2)
    tamper_cache(h, agent)
    h.run()
    assert h.ctl.failed is None
    requests = h.sent("model_request")
    assert [(r.src, r.body["hop"]) for r in requests] == [(agent, hop)]
    assert "digest" in requests[0].body["reason"]  # it fetched the whole model
    assert all(np.array_equal(h.final[k], ref.final[k]) for k in ref.final)


@pytest.mark.expect_errors
def test_a_damaged_copy_is_never_resent(tmp_path: Path) -> None:
    """An agent that trains twice in a row is its own sender: with its only copy damaged, the trial fails
    with the reason instead of training on a model nobody trained."""
    ref = TrialBed(tmp_path / "ref", agents=2, rounds=2)
    ref.run()
    hop, agent = first_delta(ref, from_itself=True)
    h = TrialBed(tmp_path / "h", agents=2, rounds=2)
    tamper_cache(h, agent)
    h.run()
    assert h.ctl.failed is not None
    assert f"cannot resend the model for hop {hop}" in h.ctl.failed and "damaged" in h.ctl.failed
    assert len(h.log) == hop  # nothing trained on the damaged copy


def test_fp16_compression_works_with_deltas(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=3, rounds=2, compression="fp16")
    h.run()
    assert h.ctl.failed is None
    final = h.final
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


def test_fedavg_keeps_whole_transfers(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=2, algorithm="fedavg")
    h.run()
    sizes = [size for _, _, size in h.model_transfers()]
    assert len(sizes) == 8 and all(size > 0.95 * full_size(h) for size in sizes)


def test_a_repeated_hello_is_answered_quietly_and_a_restarted_agent_is_reported(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2)
    ctl: Controller = h.ctl

    def say_hello(agent: str, instance: str, now: float) -> tuple[list[str], list[type]]:
        body = to_body(dataclasses.replace(hello(agent), instance=instance))
        step = ctl.handle(topics.coordinator_inbox(), encode(Envelope("hello", agent, topics.COORDINATOR, body)), now)
        return [decode(o.payload).type for o in step.out], [type(e) for e in step.events]

    say_hello("a0", "first-a0", 0.0)
    say_hello("a1", "first-a1", 0.1)
    assert ctl.plan is not None
    # agents repeat their hello every few seconds while the artifacts build: nothing to say yet
    assert say_hello("a0", "first-a0", 1.0) == ([], [])
    job = BuildArtifacts(ctl.plan)
    ctl.job_done(job, h.jobs.build(job), 2.0)
    # once assigned, a repeated hello (the assignment crossed it) gets the assignment again, quietly
    sent, events = say_hello("a0", "first-a0", 3.0)
    assert "assign" in sent and Warned not in events
    sent, events = say_hello("a0", "second-a0", 9.0)  # the agent process restarted
    assert "assign" in sent and Warned in events


@pytest.mark.expect_errors
def test_the_controller_stays_responsive_while_the_artifacts_build(tmp_path: Path) -> None:
    """Planning asks for a build job and returns at once; nothing is assigned until the build is back."""
    h = TrialBed(tmp_path, agents=2)
    ctl = h.ctl
    for i, agent in enumerate(("a0", "a1")):
        env = Envelope("hello", agent, topics.COORDINATOR, to_body(hello(agent)))
        step = ctl.handle(topics.coordinator_inbox(), encode(env), float(i))
    assert ctl.plan is not None and [type(j) for j in step.jobs] == [BuildArtifacts] and not step.out
    assert not ctl.tasks and not ctl.tick(500.0).events  # a long build is no hop timeout
    job = step.jobs[0]
    assert isinstance(job, BuildArtifacts)
    step = ctl.job_done(job, RuntimeError("export failed: out of memory"), 501.0)
    assert ctl.failed == "cannot build the plan's artifacts: export failed: out of memory"
