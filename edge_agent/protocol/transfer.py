"""Chunked, digest-checked transfers of bytes (tensors, artifact bundles).

Pure logic: functions take the time as an argument and return messages; no
sockets, clocks or threads. A sender's ``Outbox`` keeps every transfer until the
receiver acknowledges the whole-transfer sha256; a receiver's ``Reassembler``
checks each chunk's sha256, asks again for chunks that are corrupt or missing,
and acknowledges duplicates of finished transfers again without delivering them
twice (QoS 1 means duplicates happen).

Deadlines scale with the payload and the link (``throughput.LinkRates``): the sender waits for an
ack as long as the bytes in flight take at the throughput it measured to that receiver (a floor
before any measurement); the receiver waits for the next chunk as long as one chunk takes at the
rate chunks have been arriving. A sender whose deadline passes does not send the whole transfer
again: it sends one chunk as a probe, which a receiver that has everything acknowledges again and
a receiver that lacks chunks answers, once they stall, with a nack naming just those.

Memory: the sender keeps a read-only view of the caller's bytes, never a copy; ``send`` returns
``Frame``s (``frames``) that encode their chunk only when their payload is read. The receiver
appends each verified chunk to the transfer's buffer as soon as every earlier one is there and feeds
the whole-transfer digest as it goes: at the end there is nothing left to hash and no second copy.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, encode, new_id
from edge_agent.protocol.errors import ProtocolError, Rejections
from edge_agent.protocol.frames import Frame, Outgoing, PendingTransfer
from edge_agent.protocol.kinds import MessageType, Purpose
from edge_agent.protocol.messages import Chunk, TransferAck, TransferNack, body_of, to_body
from edge_agent.protocol.throughput import LinkRates, sample_bps, transfer_deadline_s

__all__ = [
    "DEFAULT_CHUNK_BYTES", "Completed", "Frame", "Outbox", "Outgoing", "PendingTransfer", "Reassembler",
    "error_message", "error_reply", "reply", "sha256_hex",
]  # fmt: skip
log = logging.getLogger(__name__)
DEFAULT_CHUNK_BYTES = 1024 * 1024


def reply(to: Envelope, me: str, kind: MessageType, body: dict[str, Any], now: float) -> Outgoing:
    env = Envelope(kind, me, to.src, body, reply_to=to.id, trial_id=to.trial_id, created_at=now)
    return Outgoing(topics.inbox(to.src), encode(env))


def error_message(
    me: str, dst: str, trial_id: str | None, code: str, message: str, now: float, reply_to: str | None = None
) -> Outgoing:
    """An error report (``error`` instead of ``body``): a failed request's reply, or news nobody asked for."""
    error = {"code": code, "message": message}
    env = Envelope(MessageType.ERROR, me, dst, reply_to=reply_to, trial_id=trial_id, created_at=now, error=error)
    return Outgoing(topics.inbox(dst), encode(env))


def error_reply(to: Envelope, me: str, code: str, message: str, now: float) -> Outgoing:
    return error_message(me, to.src, to.trial_id, code, message, now, reply_to=to.id)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Completed:
    transfer_id: str
    src: str
    trial_id: str | None
    purpose: Purpose
    meta: dict[str, Any]
    data: bytes
    sha256: str


class Outbox:
    """Sender side: frames transfers and keeps them until acknowledged."""

    def __init__(
        self, me: str, ack_timeout_s: float = 30.0, max_attempts: int = 6, rates: LinkRates | None = None
    ) -> None:
        self.me = me
        self.ack_timeout_s = ack_timeout_s  # allowance on top of the bytes' time on the link
        self.max_attempts = max_attempts
        self.rates = rates if rates is not None else LinkRates()  # by receiver
        self.pending: dict[str, PendingTransfer] = {}
        self.last_now = float("-inf")  # the latest time we were given (for an ack that brings none)

    def _saw(self, now: float) -> None:
        self.last_now = max(self.last_now, now)

    def ack_wait_s(self, p: PendingTransfer) -> float:
        """How long after ``p.sent_at`` an ack for ``p`` is due: the bytes queued on our link up to and
        including ``p`` (every transfer handed over no later than ``p``) at the throughput to ``p.dst``."""
        queued = sum(q.in_flight for q in self.pending.values() if q.sent_at <= p.sent_at)
        return self.rates.deadline_s(p.dst, queued, self.ack_timeout_s)

    def eta_s(self, dst: str, nbytes: int) -> float:
        """How long ``nbytes`` to ``dst`` may take before an ack is overdue (for callers' own deadlines)."""
        return self.rates.deadline_s(dst, nbytes, self.ack_timeout_s)

    def send(
        self,
        dst: str,
        trial_id: str | None,
        purpose: Purpose | str,
        meta: dict[str, Any],
        data: bytes,
        chunk_bytes: int,
        now: float,
    ) -> tuple[PendingTransfer, list[Outgoing]]:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        purpose = Purpose(purpose)  # ValueError for a purpose the protocol does not know
        self._saw(now)
        source = memoryview(data).toreadonly().cast("B")
        count = max(1, -(-len(source) // chunk_bytes))
        ids = [new_id() for _ in range(count)]
        pending = PendingTransfer(new_id(), dst, purpose, meta, hashlib.sha256(source).hexdigest(), len(source),
                                  source, chunk_bytes, ids, self.me, trial_id, now, now)  # fmt: skip
        pending.in_flight = sum(pending.frame_size(s) for s in range(count))
        self.pending[pending.transfer_id] = pending
        return pending, pending.frames(list(range(count)))

    def on_ack(self, ack: TransferAck, now: float | None = None) -> PendingTransfer | None:
        """The receiver has it all: drop our copy. None if unknown or digest differs.

        A transfer acknowledged without any resend is a throughput sample for its receiver; ``now``
        is when the ack came (default: the latest time this outbox was given, up to a tick early)."""
        pending = self.pending.get(ack.transfer_id)
        if pending is None:
            return None
        if ack.sha256 != pending.sha256:
            log.warning(
                "ack for transfer %s carries digest %s, expected %s", ack.transfer_id, ack.sha256, pending.sha256
            )
            return None
        if now is not None:
            self._saw(now)
        if not pending.resent:
            rate = self.rates.observe(pending.dst, pending.in_flight, self.last_now - pending.sent_at)
            if rate is not None:
                log.debug("throughput to %s: %.0f kB/s (transfer %s)", pending.dst, rate / 1e3, ack.transfer_id)
        return self.pending.pop(ack.transfer_id)

    def on_nack(self, nack: TransferNack, now: float) -> list[Outgoing]:
        self._saw(now)
        pending = self.pending.get(nack.transfer_id)
        if pending is None:
            return []
        seqs = [s for s in nack.missing if 0 <= s < pending.count] or list(range(pending.count))
        log.info(
            "resending %d chunk(s) of transfer %s to %s: %s", len(seqs), nack.transfer_id, pending.dst, nack.reason
        )
        in_flight = sum(pending.frame_size(s) for s in seqs)
        pending.sent_at, pending.attempts, pending.resent, pending.in_flight = now, 1, True, in_flight
        return pending.frames(seqs)

    def postpone(self, now: float) -> None:
        """The link is down: what waits for an ack is not late (the broker keeps it); count from ``now``."""
        for p in self.pending.values():
            p.sent_at, p.resent = max(p.sent_at, now), True  # an outage says nothing of the link's rate

    def tick(self, now: float) -> tuple[list[Outgoing], list[PendingTransfer]]:
        """Probe overdue transfers with one chunk; return those that ran out of attempts.

        The probe (the last chunk) is all that is resent: a receiver that has the transfer acks it
        again, one that misses chunks nacks them (``Reassembler.tick``), and a link that is merely
        slower than we thought carries one chunk more. The bytes in flight stay counted, so the next
        deadline is as long as this one was."""
        self._saw(now)
        out: list[Outgoing] = []
        failed: list[PendingTransfer] = []
        waits = {tid: self.ack_wait_s(p) for tid, p in self.pending.items()}
        for tid, p in list(self.pending.items()):
            if now - p.sent_at < waits[tid]:
                continue
            if p.attempts >= self.max_attempts:
                failed.append(self.pending.pop(tid))
                continue
            p.attempts, p.sent_at, p.resent = p.attempts + 1, now, True
            log.warning(
                "no ack for transfer %s to %s after %.0f s (%d bytes at %.0f kB/s); probing with chunk %d/%d (attempt %d)",
                tid, p.dst, waits[tid], p.in_flight, self.rates.assumed_bps(p.dst) / 1e3,
                p.count - 1, p.count, p.attempts,
            )  # fmt: skip
            out += p.frames([p.count - 1])
        return out, failed


@dataclass
class _Partial:
    first: Chunk
    src: str
    trial_id: str | None
    parts: dict[int, bytes] = field(default_factory=dict)  # chunks that came ahead of their turn, by seq
    joined: bytearray = field(default_factory=bytearray)  # chunks 0 .. next_seq - 1, in order
    digest: Any = field(default_factory=hashlib.sha256)  # of ``joined``, fed as it grows
    next_seq: int = 0
    last_seen: float = 0.0
    nacks: int = 0  # requests since the last new chunk
    first_seen: float = 0.0  # arrival of the first chunk stored
    bytes_after_first: int = 0  # what arrived since then (the arrival rate's numerator)

    def has(self, seq: int) -> bool:
        return seq < self.next_seq or seq in self.parts

    def received(self) -> int:
        return self.next_seq + len(self.parts)

    def store(self, seq: int, data: bytes) -> None:
        """Keep a verified chunk: appended to the transfer's buffer as soon as every earlier one is there.

        Joining as chunks arrive (MQTT keeps one publisher's order) holds the transfer once plus the
        chunks that came early; joining at the end would hold every chunk and the joined copy at once
        (measured: 2.25x the payload at the receiver's peak, the freed chunks stayed resident)."""
        if self.has(seq):
            return
        self.parts[seq] = data
        while self.next_seq in self.parts:
            data = self.parts.pop(self.next_seq)
            self.joined += data  # realloc grows the buffer in place (mremap), copies only the chunk
            self.digest.update(data)
            self.next_seq += 1

    def reset(self) -> None:
        self.parts.clear()
        self.joined, self.next_seq, self.digest = bytearray(), 0, hashlib.sha256()


class Reassembler:
    """Receiver side: checks and joins chunks, acknowledges whole transfers."""

    def __init__(
        self,
        me: str,
        max_transfer_bytes: int = 2 << 30,
        max_chunk_bytes: int = 16 << 20,
        stale_after_s: float = 10.0,
        max_nacks: int = 5,
        remember: int = 1024,
        max_partial: int = 256,
        rejections: Rejections | None = None,
    ) -> None:
        self.me = me
        self.max_transfer_bytes = max_transfer_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.stale_after_s = stale_after_s  # allowance on top of one chunk's time on the link
        self.max_nacks = max_nacks
        self.rates = LinkRates()  # by sender, from chunk arrivals
        self.partial: dict[str, _Partial] = {}
        self.done: OrderedDict[str, str] = OrderedDict()  # transfer id -> sha256, most recent last
        self.remember = remember
        self.rejections = rejections or Rejections()  # chunks that fail their digest, transfers given up
        self.max_partial = max_partial  # transfers in progress at once (a flood of first chunks cannot exhaust memory)

    def add(self, env: Envelope, now: float) -> tuple[Completed | None, list[Outgoing]]:
        """One chunk frame in; maybe a finished transfer and replies out."""
        chunk = body_of(Chunk, env.body)
        data = env.data or b""
        if chunk.transfer_id in self.done:  # duplicate of a finished transfer: ack again, deliver nothing
            ack = TransferAck(chunk.transfer_id, self.done[chunk.transfer_id])
            return None, [reply(env, self.me, MessageType.TRANSFER_ACK, to_body(ack), now)]
        problem = self._refuse(chunk, data)
        if problem is not None:
            raise ProtocolError(*problem)  # a transfer in progress keeps its chunks: this one may be foreign
        part = self.partial.get(chunk.transfer_id)
        first = part.first if part is not None else chunk
        if (chunk.count, chunk.size, chunk.sha256) != (first.count, first.size, first.sha256):
            raise ProtocolError("malformed", f"chunk {chunk.seq} of {chunk.transfer_id} disagrees with earlier chunks")
        if sha256_hex(data) != chunk.chunk_sha256:  # nothing is kept of a chunk that fails its digest
            log.warning(
                "chunk %d/%d of transfer %s from %s failed its digest; asking again",
                chunk.seq,
                chunk.count,
                chunk.transfer_id,
                env.src,
            )
            self.rejections.add("digest")
            nack = TransferNack(chunk.transfer_id, [chunk.seq], "chunk digest mismatch")
            return None, [reply(env, self.me, MessageType.TRANSFER_NACK, to_body(nack), now)]
        if part is None:
            if len(self.partial) >= self.max_partial:
                raise ProtocolError("busy", f"{len(self.partial)} transfers already in progress here")
            part = self.partial[chunk.transfer_id] = _Partial(chunk, env.src, env.trial_id)
        part.last_seen = now
        if not part.has(chunk.seq):  # progress: the sender is alive and the link moves
            if part.received():
                part.bytes_after_first += len(data)
            else:
                part.first_seen = now
            part.nacks = 0
        part.store(chunk.seq, data)
        if part.received() < chunk.count:
            return None, []
        return self._finish(env, part, now)

    def _refuse(self, chunk: Chunk, data: bytes) -> tuple[str, str] | None:
        if chunk.size > self.max_transfer_bytes:
            return "oversize", f"transfer {chunk.transfer_id} of {chunk.size} bytes exceeds {self.max_transfer_bytes}"
        if len(data) > self.max_chunk_bytes:
            return "oversize", f"chunk of {len(data)} bytes exceeds {self.max_chunk_bytes}"
        if not 0 <= chunk.seq < chunk.count or chunk.count > chunk.size + 1:
            return "malformed", f"chunk seq {chunk.seq} / count {chunk.count} out of range"
        return None

    def _finish(self, env: Envelope, part: _Partial, now: float) -> tuple[Completed | None, list[Outgoing]]:
        first = part.first
        data: bytes = part.joined  # type: ignore[assignment]  # a bytearray, which reads like bytes
        if len(data) != first.size or part.digest.hexdigest() != first.sha256:
            log.warning(
                "transfer %s from %s failed its whole digest; asking for all of it again", first.transfer_id, part.src
            )
            part.reset()
            self.rejections.add("digest")
            nack = TransferNack(first.transfer_id, [], "transfer digest mismatch")
            return None, [reply(env, self.me, MessageType.TRANSFER_NACK, to_body(nack), now)]
        del self.partial[first.transfer_id]
        self.rates.observe(part.src, part.bytes_after_first, now - part.first_seen)
        self.done[first.transfer_id] = first.sha256
        while len(self.done) > self.remember:
            self.done.popitem(last=False)
        done = Completed(first.transfer_id, part.src, part.trial_id, first.purpose, first.meta, data, first.sha256)
        ack = TransferAck(first.transfer_id, first.sha256)
        return done, [reply(env, self.me, MessageType.TRANSFER_ACK, to_body(ack), now)]

    def postpone(self, now: float) -> None:
        """The link is down: chunks still on their way are not missing yet; count from ``now``."""
        for part in self.partial.values():
            part.last_seen = max(part.last_seen, now)

    def tick(self, now: float) -> list[Outgoing]:
        """Ask for the missing chunks of transfers that stalled; give up after max_nacks."""
        out: list[Outgoing] = []
        for tid, part in list(self.partial.items()):
            if now - part.last_seen < self.stale_after(part):
                continue
            if part.nacks >= self.max_nacks:  # a real sender keeps its data and resends: nothing is lost here
                log.warning(
                    "giving up on transfer %s from %s: %d/%d chunks after %d requests",
                    tid,
                    part.src,
                    part.received(),
                    part.first.count,
                    part.nacks,
                )
                del self.partial[tid]
                self.rejections.add("stalled")
                continue
            part.nacks, part.last_seen = part.nacks + 1, now
            missing = [s for s in range(part.first.count) if not part.has(s)]
            nack = TransferNack(tid, missing, "chunks missing")
            env = Envelope(
                MessageType.TRANSFER_NACK, self.me, part.src, to_body(nack), trial_id=part.trial_id, created_at=now
            )
            out.append(Outgoing(topics.inbox(part.src), encode(env)))
        return out

    def stale_after(self, part: _Partial) -> float:
        """Seconds without a chunk before ``part`` counts as stalled: the allowance plus one chunk's
        time at the rate its chunks have been arriving (else at what this sender's last transfers showed)."""
        own = sample_bps(part.bytes_after_first, part.last_seen - part.first_seen)
        rates = self.rates
        rate = max(rates.floor_bps, own / rates.safety) if own is not None else rates.assumed_bps(part.src)
        return transfer_deadline_s(-(-part.first.size // part.first.count), rate, self.stale_after_s)
