"""Transfer deadlines scale with the payload and the measured link, so a slow link looks slow, not dead,
and a missed deadline costs one chunk, not the whole transfer again (pure logic, a fake clock)."""

from __future__ import annotations

import pytest

from edge_agent.protocol.envelope import decode
from edge_agent.protocol.messages import Chunk, TransferAck, TransferNack, body_of
from edge_agent.protocol.throughput import FLOOR_BPS, LinkRates, sample_bps, transfer_deadline_s
from edge_agent.protocol.transfer import Outbox, Reassembler

MB = 1_000_000
MIB = 1 << 20
ONE_MBIT = 125_000.0  # bytes/s


def test_the_deadline_is_the_allowance_plus_the_bytes_over_the_rate() -> None:
    assert transfer_deadline_s(MB, ONE_MBIT, 30.0) == pytest.approx(38.0)  # 1 MB at 1 Mbit/s: 8 s
    assert transfer_deadline_s(700 * MB, ONE_MBIT, 30.0) == pytest.approx(5630.0)  # a 700 MB hand-off
    with pytest.raises(ValueError):
        transfer_deadline_s(MB, 0.0, 30.0)


def test_rates_start_at_the_floor_and_count_on_half_of_what_was_measured() -> None:
    rates = LinkRates()
    assert rates.assumed_bps("a1") == FLOOR_BPS
    assert rates.observe("a1", 1000, 0.01) is None  # too small: latency, not throughput
    assert rates.observe("a1", 2 * MB, 16.0) == pytest.approx(ONE_MBIT)
    assert rates.assumed_bps("a1") == pytest.approx(ONE_MBIT / 2)
    assert rates.assumed_bps("a2") == FLOOR_BPS  # per peer
    rates.observe("a1", 2 * MB, 8.0)  # moving average
    assert rates.measured["a1"] == pytest.approx(1.5 * ONE_MBIT)
    assert sample_bps(MB, 0.001) == MB  # a sub-second transfer counts as one second: never overstated
    rates.observe("a3", 100_000, 1000.0)  # 100 B/s measured: deadlines still assume the floor
    assert rates.assumed_bps("a3") == FLOOR_BPS


def test_a_slow_link_gets_a_deadline_from_its_size_and_a_miss_costs_one_chunk() -> None:
    outbox = Outbox("a0")
    pending, frames = outbox.send("a1", "t1", "model", {}, bytes(2 * MB), MIB, now=0.0)
    assert len(frames) == 2
    due = outbox.ack_wait_s(pending)
    assert due == pytest.approx(30.0 + pending.in_flight / FLOOR_BPS)  # ~155 s, not the old 32 s
    assert outbox.tick(due - 1.0) == ([], [])
    probe, failed = outbox.tick(due)
    assert not failed and len(probe) == 1  # one chunk, not the whole transfer again
    assert body_of(Chunk, decode(probe[0].payload).body).seq == 1
    assert pending.attempts == 2 and pending.in_flight > 2 * MB  # still counted: the next wait is as long
    assert outbox.ack_wait_s(pending) == pytest.approx(due)


def test_an_ack_measures_the_link_and_later_deadlines_follow_it() -> None:
    outbox = Outbox("a0")
    pending, _ = outbox.send("a1", "t1", "model", {}, bytes(2 * MB), MIB, now=100.0)
    outbox.on_ack(TransferAck(pending.transfer_id, pending.sha256), now=116.0)  # 2 MB in 16 s: 1 Mbit/s
    assert outbox.rates.measured["a1"] == pytest.approx(pending.in_flight / 16.0)
    # a 700 MB hand-off on that link may take ~3 h (half the measured rate), not the old 730 s
    assert outbox.eta_s("a1", 700 * MB) == pytest.approx(30.0 + 700 * MB / (pending.in_flight / 32.0))
    assert outbox.eta_s("a2", MB) == pytest.approx(30.0 + MB / FLOOR_BPS)  # another receiver: the floor


def test_an_ack_without_a_time_uses_the_latest_tick() -> None:
    outbox = Outbox("a0")
    pending, _ = outbox.send("a1", "t1", "model", {}, bytes(MB), MIB, now=0.0)
    outbox.tick(10.0)
    outbox.on_ack(TransferAck(pending.transfer_id, pending.sha256))
    assert outbox.rates.measured["a1"] == pytest.approx(pending.in_flight / 10.0)


def test_a_resent_transfer_is_no_measurement_and_a_nack_resends_only_what_it_names() -> None:
    outbox = Outbox("a0")
    pending, frames = outbox.send("a1", "t1", "model", {}, bytes(3 * MB), MIB, now=0.0)
    outbox.tick(outbox.ack_wait_s(pending))  # probe: attempt 2
    again = outbox.on_nack(TransferNack(pending.transfer_id, [0, 2], "chunks missing"), now=300.0)
    assert [o.payload for o in again] == [frames[0].payload, frames[2].payload]
    assert pending.attempts == 1  # the receiver answered: it is alive
    assert pending.in_flight == len(frames[0].payload) + len(frames[2].payload)
    assert outbox.on_ack(TransferAck(pending.transfer_id, pending.sha256), now=310.0) is pending
    assert "a1" not in outbox.rates.measured


def test_transfers_queued_together_wait_for_each_other() -> None:
    outbox = Outbox("a0")
    first, _ = outbox.send("a1", "t1", "model", {}, bytes(MB), MIB, now=0.0)
    second, _ = outbox.send("coordinator", "t1", "checkpoint", {}, bytes(MB), MIB, now=0.0)
    later, _ = outbox.send("a1", "t1", "model", {}, bytes(MB), MIB, now=1.0)
    total = first.in_flight + second.in_flight
    assert outbox.ack_wait_s(first) == outbox.ack_wait_s(second) == pytest.approx(30.0 + total / FLOOR_BPS)
    assert outbox.ack_wait_s(later) == pytest.approx(30.0 + (total + later.in_flight) / FLOOR_BPS)


def test_a_dead_receiver_still_fails_after_max_attempts() -> None:
    outbox = Outbox("a0", max_attempts=3)
    pending, _ = outbox.send("a1", "t1", "model", {}, bytes(100), 4096, now=0.0)
    now, probes, failed = 0.0, 0, []
    while not failed:
        now = pending.sent_at + outbox.ack_wait_s(pending) + 1e-6
        out, failed = outbox.tick(now)
        probes += len(out)
    assert failed == [pending] and probes == 2 and now == pytest.approx(3 * 30.0, rel=0.01)


def slow_chunks(count: int, every_s: float) -> tuple[Reassembler, list, float]:
    """A receiver fed chunks 0..count-2 of a ``count`` MiB transfer, one every ``every_s`` s."""
    _, frames = Outbox("a0").send("a1", "t1", "model", {}, bytes(count * MIB), MIB, now=0.0)
    inbox = Reassembler("a1")
    now = 0.0
    for out in frames[:-1]:
        now += every_s
        done, replies = inbox.add(decode(out.payload), now)
        assert done is None and not replies
    return inbox, frames, now


def test_a_receiver_on_a_slow_link_waits_for_the_next_chunk_as_long_as_one_takes() -> None:
    inbox, _, last = slow_chunks(4, every_s=20.0)  # 1 MiB per 20 s: ~420 kbit/s
    (part,) = inbox.partial.values()
    wait = inbox.stale_after(part)
    assert wait == pytest.approx(10.0 + MIB / ((2 * MIB / 40.0) / 2))  # one chunk at half the seen rate: 50 s
    assert inbox.tick(last + 25.0) == []  # the old fixed 10 s would have asked for chunk 3 here
    (nack,) = inbox.tick(last + wait)
    assert body_of(TransferNack, decode(nack.payload).body).missing == [3]


def test_a_new_chunk_resets_the_receivers_patience_and_a_finished_transfer_measures_the_sender() -> None:
    _, frames = Outbox("a0").send("a1", "t1", "model", {}, bytes(4 * MIB), MIB, now=0.0)
    inbox = Reassembler("a1")
    inbox.add(decode(frames[0].payload), 1.0)
    inbox.add(decode(frames[1].payload), 2.0)
    (part,) = inbox.partial.values()
    part.nacks = 4  # one short of giving up
    inbox.add(decode(frames[1].payload), 3.0)  # a duplicate is no progress
    assert part.nacks == 4
    inbox.add(decode(frames[2].payload), 4.0)
    assert part.nacks == 0
    done, _ = inbox.add(decode(frames[3].payload), 5.0)
    assert done is not None
    assert inbox.rates.measured["a0"] == pytest.approx(3 * MIB / 4.0)  # chunks 1-3 in the 4 s after chunk 0
