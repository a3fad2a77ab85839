"""Large transfers in bounded memory (pure logic): the sender frames chunks only when a frame is read,
from a view of the caller's bytes, and the receiver joins and hashes as chunks arrive."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from edge_agent.protocol.envelope import decode
from edge_agent.protocol.messages import Chunk, TransferAck, body_of
from edge_agent.protocol.transfer import Frame, Outbox, Reassembler

MIB = 1 << 20


def test_sending_copies_nothing_and_frames_are_made_one_at_a_time_and_identically_again() -> None:
    data = os.urandom(16 * MIB)
    tracemalloc.start()
    try:
        pending, frames = Outbox("a0").send("a1", "t1", "model", {"hop": 1}, data, MIB, now=5.0)
        _, sending = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sizes = [len(f.payload) for f in frames]  # each frame made, measured and dropped
        _, framing = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sending < MIB // 4  # ids and bookkeeping only: no frame, no copy of the payload
    assert framing < 3 * MIB  # one frame (and its chunk's view) at a time
    assert all(isinstance(f, Frame) for f in frames) and len(frames) == 16
    assert pending.in_flight == sum(sizes)  # counted without making them
    assert frames[3].payload == frames[3].payload  # a resend is byte-identical
    env = decode(frames[15].payload)
    chunk = body_of(Chunk, env.body)
    assert (chunk.seq, chunk.count, chunk.size, env.created_at) == (15, 16, len(data), 5.0)
    assert env.data == data[15 * MIB :] and chunk.chunk_sha256 == hashlib.sha256(env.data).hexdigest()


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_the_receiver_holds_the_payload_once_and_checks_the_whole_digest_as_it_goes(order: str) -> None:
    data = os.urandom(8 * MIB + 5)
    outbox, rx = Outbox("a0"), Reassembler("a1")
    pending, frames = outbox.send("a1", "t1", "model", {}, data, MIB, now=0.0)
    if order == "reversed":
        frames = frames[::-1]
    done = None
    for frame in frames:
        done, replies = rx.add(decode(frame.payload), 1.0)
    assert done is not None and bytes(done.data) == data
    ack = body_of(TransferAck, decode(replies[0].payload).body)
    assert outbox.on_ack(ack, 2.0) is pending and not outbox.pending
