"""A receiver joins a transfer as chunks arrive: out of order, duplicated or corrupt, it still delivers it once, intact."""

from __future__ import annotations

import os

from edge_agent.protocol.envelope import decode
from edge_agent.protocol.kinds import Purpose
from edge_agent.protocol.transfer import Outbox, Reassembler

NOW = 1000.0


def frames(data: bytes, chunk: int) -> list[bytes]:
    _, out = Outbox("tx").send("rx", None, Purpose.MODEL, {}, data, chunk, NOW)
    return [o.payload for o in out]


def test_chunks_in_any_order_with_duplicates_arrive_whole() -> None:
    data = os.urandom(10_000)
    wire = frames(data, 1000)
    order = [9, 3, 3, 0, 1, 2, 8, 0, 4, 5, 7, 6]  # last chunk first, duplicates before and after their turn
    rx, delivered = Reassembler("rx"), []
    for seq in order:
        done, _ = rx.add(decode(wire[seq]), NOW)
        if done is not None:
            delivered.append(done)
    assert [bytes(d.data) for d in delivered] == [data]


def test_a_stall_asks_only_for_the_chunks_not_yet_joined() -> None:
    wire = frames(os.urandom(5_000), 1000)
    rx = Reassembler("rx", stale_after_s=1.0)
    for seq in (0, 1, 3):
        rx.add(decode(wire[seq]), NOW)
    (nack,) = rx.tick(NOW + 60)
    assert decode(nack.payload).body["missing"] == [2, 4]


def test_a_corrupt_chunk_is_asked_for_again_and_then_joined() -> None:
    data = os.urandom(3_000)
    wire = frames(data, 1000)
    rx = Reassembler("rx")
    rx.add(decode(wire[0]), NOW)
    bad = bytearray(wire[1])
    bad[-1] ^= 1
    done, replies = rx.add(decode(bytes(bad)), NOW)
    assert done is None and decode(replies[0].payload).body["missing"] == [1]
    rx.add(decode(wire[1]), NOW)
    done, _ = rx.add(decode(wire[2]), NOW)
    assert done is not None and bytes(done.data) == data
