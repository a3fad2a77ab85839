"""What a transfer puts on the wire: publishes, and the chunk frames of a pending transfer, made on demand.

A ``PendingTransfer`` keeps a read-only view of the caller's bytes, never a copy, and the id of each
chunk's frame; ``Frame.payload`` encodes one chunk (its digest, its header, one copy of its bytes)
each time it is read, so a link that publishes one frame at a time holds one frame at a time, and a
resend is byte-identical. Pure logic; ``transfer`` re-exports these names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, encode
from edge_agent.protocol.kinds import MessageType, Purpose
from edge_agent.protocol.messages import Chunk, to_body


@dataclass(frozen=True)
class Outgoing:
    """One MQTT publish."""

    topic: str
    payload: bytes
    retain: bool = False

    @property
    def size(self) -> int:
        """``len(payload)``, without making a frame's payload."""
        return len(self.payload)


class Frame(Outgoing):
    """A chunk frame of a pending transfer, encoded each time its ``payload`` is read (not kept)."""

    transfer: PendingTransfer
    seq: int

    def __init__(self, topic: str, transfer: PendingTransfer, seq: int) -> None:  # no super(): payload is computed
        for name, value in (("topic", topic), ("retain", False), ("transfer", transfer), ("seq", seq)):
            object.__setattr__(self, name, value)

    @property  # a field on Outgoing, computed here
    def payload(self) -> bytes:
        return self.transfer.frame(self.seq)

    @property
    def size(self) -> int:
        return self.transfer.frame_size(self.seq)


@dataclass
class PendingTransfer:
    transfer_id: str
    dst: str
    purpose: Purpose
    meta: dict[str, Any]
    sha256: str
    size: int
    source: memoryview  # the caller's bytes (read-only view, no copy); frames are cut from it on demand
    chunk_bytes: int
    ids: list[str]  # envelope id of each chunk's frame (a resend is byte-identical)
    src: str
    trial_id: str | None
    created_at: float
    sent_at: float  # when frames were last handed to the link
    attempts: int = 1  # sends since the receiver was last heard from (a nack resets it)
    in_flight: int = 0  # bytes handed to the link and not known to have arrived
    resent: bool = False  # a send time no longer tells how long the receiver took (no throughput sample)

    @property
    def count(self) -> int:
        return len(self.ids)

    def _part(self, seq: int) -> memoryview:
        return self.source[seq * self.chunk_bytes : (seq + 1) * self.chunk_bytes]

    def _head(self, seq: int, chunk_sha256: str) -> bytes:
        """The frame without its data (an envelope with empty data encodes to just the frame header)."""
        body = Chunk(self.transfer_id, self.purpose, seq, self.count, self.size, self.sha256, chunk_sha256, self.meta)
        env = Envelope(MessageType.CHUNK, self.src, self.dst, to_body(body), id=self.ids[seq],
                       trial_id=self.trial_id, created_at=self.created_at, data=b"")  # fmt: skip
        return encode(env)

    def frame(self, seq: int) -> bytes:
        """Chunk ``seq``'s wire frame: its digest, its header, one copy of its bytes."""
        part = self._part(seq)
        return self._head(seq, hashlib.sha256(part).hexdigest()) + part

    def frame_size(self, seq: int) -> int:
        """``len(frame(seq))`` without hashing or copying (a digest's hex form has a fixed length)."""
        return len(self._head(seq, "0" * 64)) + len(self._part(seq))

    def frames(self, seqs: list[int]) -> list[Outgoing]:
        return [Frame(topics.inbox(self.dst), self, s) for s in seqs]
