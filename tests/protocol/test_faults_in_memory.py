"""Lost, hung and restarted agents in whole in-memory trials (real services, fake trainers, simulated time).

The fake trainer adds the same step to a segment whoever trains it, so a trial that trains every hop
exactly once ends on the same model as the fault-free run, whichever agents did the work: a hop
skipped or trained twice shows in the final model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.controller import Step
from coordinator.events import Fault, Replanned
from coordinator.journal import Journal
from edge_agent.memlink import Delivery, Tamper
from edge_agent.protocol.envelope import decode
from edge_agent.protocol.errors import ProtocolError
from tests.protocol.trial_bed import TrialBed


def reference(tmp: Path, **kw: object) -> dict[str, np.ndarray]:
    ref = TrialBed(tmp / "ref", **kw)  # type: ignore[arg-type]
    ref.run()
    return ref.final


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def published_by(h: TrialBed, agent: str, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return [e.body for _, p in h.broker.published if p[:1] == b"{" and (e := decode(p)).src == agent and e.type == kind]


def faults(h: TrialBed) -> list[Fault]:
    return [e for e in h.events if isinstance(e, Fault)]


def silencing(who: set[str], only_frames: bool = False, statuses: bool = True) -> Tamper:
    """A tamper that drops what the agents in ``who`` publish (only chunk frames; statuses kept or not)."""

    def tamper(topic: str, payload: bytes) -> list[Delivery]:
        if only_frames and payload[:4] != b"SNK1":
            return [Delivery(payload)]
        try:
            src = decode(payload).src
        except ProtocolError:
            return [Delivery(payload)]
        return [] if src in who and (statuses or "status" not in topic) else [Delivery(payload)]

    return tamper


def test_an_agent_killed_while_its_model_travels_to_it_is_routed_around(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True)
    h.run(until=lambda: bool(h.ctl.tasks))
    victim = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    h.crash(victim)  # its persistent session queues the model hop 0 hands it; nobody will read it
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)  # every hop trained exactly once
    assert victim in h.ctl.lost and "offline" in h.ctl.lost[victim]
    assert all(hop.agent != victim for hop in h.ctl.plan.hops[1:])  # type: ignore[union-attr]
    (fault,) = faults(h)
    assert (fault.kind, fault.agent, fault.hop) == ("agent_lost", victim, 1)
    assert h.ctl.hops_lost == 0
    assert any(isinstance(e, Replanned) and e.start == 1 for e in h.events)
    assert published_by(h, "coordinator", "hand_off")  # the sender of hop 0 handed its model to the substitute


def test_an_agent_killed_mid_hop_has_its_hop_trained_again_elsewhere(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    armed: set[str] = set()

    silence = silencing(armed, statuses=False)  # the victim's last words never leave it

    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True, tamper=silence)
    h.run(until=lambda: 1 in h.ctl.done_hops)
    victim = h.ctl.plan.hops[2].agent  # type: ignore[union-attr]
    armed.add(victim)  # from here on it trains, but nothing it sends gets out: then it dies
    h.run(until=lambda: 2 in h.ctl.hop_started_at or h.clock.now > 30)
    h.crash(victim)
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert h.ctl.hops_lost == 0
    assert [f.kind for f in faults(h)] == ["agent_lost"]


def test_a_sender_that_dies_after_training_hands_its_model_on_when_it_comes_back(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    dropping: set[str] = set()

    lose_models_from = silencing(dropping, only_frames=True)

    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True, tamper=lose_models_from)
    h.run(until=lambda: h.ctl.plan is not None)
    sender = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    dropping.add(sender)  # its hand-off after hop 1 never arrives...
    h.run(until=lambda: 1 in h.ctl.done_hops)
    h.crash(sender)  # ...and it dies before anyone acknowledged it: the model exists only on its disk
    h.clock.advance(10.0)  # longer than offline_s, shorter than holder_s: the coordinator waits for it
    h.run(until=lambda: h.clock.now > 20)
    assert sender not in h.ctl.lost
    dropping.clear()
    h.restart(sender)
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert h.ctl.hops_lost == 0 and sender not in h.ctl.lost
    assert [f.kind for f in faults(h)] == ["agent_restarted"]
    assert [b["hop"] for b in published_by(h, "coordinator", "hand_off")] == [2]


def test_a_sender_that_never_comes_back_costs_its_hop_which_is_trained_again(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    dropping: set[str] = set()

    lose_models_from = silencing(dropping, only_frames=True)

    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True, tamper=lose_models_from)
    h.run(until=lambda: h.ctl.plan is not None)
    sender = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    dropping.add(sender)
    h.run(until=lambda: 1 in h.ctl.done_hops)
    h.crash(sender)
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)  # hop 1 was trained again from hop 0's model: still once in the result
    assert h.ctl.hops_lost == 1 and h.ctl.hops_retried >= 1
    assert faults(h)[0].kind == "agent_lost" and faults(h)[0].hop == 2


def test_a_restarted_agent_trains_its_hop_again_and_nothing_is_lost(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    armed: set[str] = set()

    silence = silencing(armed, statuses=False)

    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True, tamper=silence)
    h.run(until=lambda: 2 in h.ctl.done_hops)
    victim = h.ctl.plan.hops[3].agent  # type: ignore[union-attr]
    armed.add(victim)
    h.run(until=lambda: h.clock.now > 200 or any(s.training for s in h.live()))
    armed.clear()
    h.restart(victim)  # back within a second: same id, a new process
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert not h.ctl.lost and h.ctl.hops_lost == 0
    assert [f.kind for f in faults(h)] == ["agent_restarted"]


def test_a_lost_agent_that_comes_back_is_planned_in_from_the_next_round(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=3)
    h = TrialBed(tmp_path / "h", agents=3, rounds=3, tolerant=True)
    h.run(until=lambda: bool(h.ctl.tasks))
    victim = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    h.crash(victim)
    h.run(until=lambda: victim in h.ctl.lost)
    h.run(until=lambda: 2 in h.ctl.done_hops)
    h.restart(victim)
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert [f.kind for f in faults(h)] == ["agent_lost", "agent_returned"]
    plan = h.ctl.plan
    assert plan is not None
    assert victim not in {x.agent for x in plan.hops if x.round == 0}
    assert victim in {x.agent for x in plan.hops if x.round == 2}  # its hops again, from a later round


def test_a_silent_agent_is_routed_around(tmp_path: Path) -> None:
    ref = reference(tmp_path, agents=3, rounds=2)
    muted: set[str] = set()

    mute = silencing(muted)  # alive on the broker, but nothing gets out

    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True, tamper=mute)
    h.run(until=lambda: h.ctl.plan is not None)
    victim = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    h.run(until=lambda: bool(h.services[victim].agent.artifacts) and not h.ctl.outbox.pending)
    muted.add(victim)
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert "silent" in h.ctl.lost[victim] or "no progress" in h.ctl.lost[victim]


@pytest.mark.expect_errors
def test_without_fault_tolerance_a_lost_agent_still_fails_the_trial_with_its_name(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=2, rounds=1, hop_timeout_s=60.0)
    h.run(until=lambda: h.ctl.plan is not None and bool(h.ctl.tasks))
    victim = h.ctl.plan.hops[1].agent  # type: ignore[union-attr]
    h.crash(victim)
    h.run()
    assert h.ctl.failed is not None and victim in h.ctl.failed


def journal_of(h: TrialBed, tmp: Path) -> tuple[list, dict, object]:  # type: ignore[type-arg]
    """What a coordinator's journal holds now (events through SQLite and back, counters, no held model)."""
    journal = Journal(tmp)
    journal.start("t1", {})
    for event in h.events:
        journal.record(event)
    journal.count(h.ctl.counters())
    read = journal.read()
    journal.close()
    return read.events, read.counters, read.model


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_a_killed_coordinator_resumes_from_its_journal_and_no_hop_is_trained_twice(tmp_path: Path, mode: str) -> None:
    ref = reference(tmp_path, agents=3, rounds=2, mode=mode)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, mode=mode, tolerant=True)
    h.run(until=lambda: 2 in h.ctl.done_hops)
    h.coordinator.link.crash()  # type: ignore[attr-defined]  # SIGKILL: its session keeps what agents send
    events, counters, held = journal_of(h, tmp_path / "journal")
    if mode == "cs":  # the coordinator relays every model: the journal keeps the one it holds
        strategy = h.coordinator.setup.strategy
        held = strategy.snapshot(h.ctl.plan)  # type: ignore[attr-defined]
    h.clock.advance(30.0)
    h.coordinator = h.coordinator_service(resume_from=(events, counters, held))
    h.coordinator.start()
    h.run()
    assert h.ctl.failed is None
    assert same(h.final, ref)
    assert len(h.log) == 6  # six hops, each trained once: none again after the resume
    assert h.ctl.resumed and h.ctl.hops_retried == 0


def test_losing_an_agent_of_a_later_hop_redirects_the_hand_off_of_the_hop_before_it(tmp_path: Path) -> None:
    h = TrialBed(tmp_path, agents=3, rounds=2, tolerant=True)
    h.run(until=lambda: bool(h.ctl.tasks))
    plan = h.ctl.plan
    assert plan is not None and not h.ctl.done_hops
    victim, before = plan.hops[2].agent, plan.hops[1].agent
    step = Step()
    h.ctl._lose(step, victim, "test", h.clock.time())  # noqa: SLF001  # the current hop (0) goes on where it is
    new = h.ctl.plan
    assert new is not None and new.hops[2].agent != victim and new.hops[0].agent == plan.hops[0].agent
    assigns = {e.dst: e.body for e in (decode(o.payload) for o in step.out) if e.type == "assign"}
    assert victim not in assigns
    task1 = next(t for t in assigns[before]["tasks"] if t["hop"] == 1)
    assert task1["next"] == new.hops[2].agent and assigns[before]["replace_from"] == 0
    assert not [o for o in step.out if decode(o.payload).type == "hand_off"]  # hop 0's model is where it was


def test_an_undelivered_model_is_not_retried_into_the_next_trial_and_foreign_chunks_are_refused(tmp_path: Path) -> None:
    from edge_agent.agent import Agent
    from edge_agent.protocol.envelope import Envelope, encode
    from edge_agent.protocol.kinds import Purpose
    from edge_agent.protocol.messages import Assign, to_body
    from edge_agent.protocol.transfer import Outbox
    from tests.protocol.trial_bed import hello

    agent = Agent(hello("a0"), set())
    agent.trial_id = "t1"
    agent.outbox.send("a1", "t1", Purpose.MODEL, {"hop": 1}, b"x" * 100, 64, 0.0)
    assign = Envelope("assign", "coordinator", "a0", to_body(Assign([], 1 << 20)), trial_id="t2")
    agent.handle("snake/v1/agents/a0/inbox", encode(assign), 1.0)
    assert agent.trial_id == "t2" and not agent.outbox.pending  # t1's hand-off is not pushed into trial t2

    h = TrialBed(tmp_path, agents=2, rounds=1)
    h.run(until=lambda: bool(h.ctl.tasks))
    _, frames = Outbox("a0").send("coordinator", "other-trial", Purpose.MODEL, {"hop": 1}, b"y" * 10, 64, 0.0)
    step = h.ctl.handle("snake/v1/coordinator/inbox", frames[0].payload, h.clock.time())
    assert h.ctl.rejections.as_dict().get("wrong_trial") == 1 and not step.events


def test_an_agent_restarted_mid_hop_while_the_coordinator_is_down_trains_its_hop_again(tmp_path: Path) -> None:
    """Found by tools/chaos.py: the coordinator is killed, the agent of the next hop starts it (its
    ``hop_started`` waits in the broker), dies and comes back before the coordinator resumes. The new
    process's hello reaches the resumed coordinator before its artifacts are built; it must still count as a
    restart (the hop's model goes to it again), not be dropped as a repeated hello (a hang until hop_s)."""
    ref = reference(tmp_path, agents=3, rounds=2)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True)
    h.run(until=lambda: 2 in h.ctl.done_hops)
    victim = h.ctl.plan.hops[3].agent  # type: ignore[union-attr]
    h.coordinator.link.crash()  # type: ignore[attr-defined]
    events, counters, held = journal_of(h, tmp_path / "journal")
    armed = [victim]

    def dies_mid_hop(topic: str, payload: bytes) -> list[Delivery]:  # only its hop_started gets out
        try:
            env = decode(payload)
        except Exception:
            return [Delivery(payload)]
        silenced = env.src in armed and "status" not in topic and env.type != "hop_started"
        return [] if silenced else [Delivery(payload)]

    h.broker.tamper = dies_mid_hop
    h.run(until=lambda: len(h.log) == 4)  # the victim trained hop 3; nothing but hop_started got out
    armed.clear()
    h.restart(victim)
    h.clock.advance(5.0)
    h.coordinator = h.coordinator_service(resume_from=(events, counters, held))
    h.coordinator.start()
    began = h.clock.now
    h.run()
    assert h.ctl.failed is None and same(h.final, ref)
    assert [f.kind for f in faults(h)] == ["agent_restarted"] and not h.ctl.lost
    assert h.ctl.hops_retried == 1 and h.ctl.hops_lost == 0
    assert h.clock.now - began < 60  # not after a deadline: at once


def test_a_replayed_offline_status_of_a_live_agent_loses_nothing(tmp_path: Path) -> None:
    from edge_agent.protocol import topics
    from edge_agent.service import status_payload

    def slow_hand_offs(topic: str, payload: bytes) -> list[Delivery]:  # each hop takes 20 s to arrive
        return [Delivery(payload, delay=20.0 if payload[:4] == b"SNK1" else 0.0)]

    ref = reference(tmp_path, agents=3, rounds=3)
    h = TrialBed(tmp_path / "h", agents=3, rounds=3, tolerant=True, tamper=slow_hand_offs)
    h.run(until=lambda: 1 in h.ctl.done_hops)
    victim = h.ctl.plan.hops[4].agent  # type: ignore[union-attr]
    # a foreign client replays the agent's retained "offline" (e.g. the will of an earlier run's process)
    h.broker.publish(topics.agent_status(victim), status_payload(victim, "offline", 0.0), True)
    h.run()
    assert h.ctl.failed is None and not h.ctl.lost and not faults(h)
    assert same(h.final, ref)


def test_a_lost_hop_report_is_inferred_from_the_next_hop_and_its_restarted_agent_trains_nothing_again(
    tmp_path: Path,
) -> None:
    """Found by tools/chaos.py: an agent finishes hop 2 and hands it on, but its ``hop_done`` dies with the
    broker's queue (a restart without persistence) and the agent is killed. Hop 3 reports done: hop 2 finished
    (hop 3 started from its output). The agent comes back; it must not be sent hop 2 again (its successor's
    cache holds hop 3's output by then, so the resend fails and the trial re-plans and retrains)."""
    ref = reference(tmp_path, agents=3, rounds=2)
    h = TrialBed(tmp_path / "h", agents=3, rounds=2, tolerant=True)
    h.run(until=lambda: h.ctl.plan is not None)
    victim = h.ctl.plan.hops[2].agent  # type: ignore[union-attr]

    def loses_the_report(topic: str, payload: bytes) -> list[Delivery]:
        try:
            env = decode(payload)
        except ProtocolError:
            return [Delivery(payload)]
        lost = env.src == victim and env.type == "hop_done" and env.body.get("hop") == 2
        return [] if lost else [Delivery(payload)]

    h.broker.tamper = loses_the_report
    h.run(until=lambda: 3 in h.ctl.done_hops, limit_s=600.0)
    assert 2 not in h.ctl.done_hops and h.ctl.unreported == {2} and h.ctl._current() == 4  # noqa: SLF001
    h.restart(victim)
    h.run()
    assert h.ctl.failed is None and same(h.final, ref)  # every hop trained exactly once
    assert h.ctl.hops_lost == 0 and h.ctl.hops_retried == 0 and not h.ctl.lost
