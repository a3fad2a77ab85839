"""Signed envelopes (optional): who sent a message, and that it is not a replay. Pure: keys come in as objects.

A signed envelope carries two more fields, ``seq`` (the sender's sequence number: strictly increasing,
microseconds of wall time at least, so it keeps increasing across restarts without state) and ``sig``
(base64 Ed25519 over ``signed_bytes``: the canonical JSON of the header without ``sig``, plus the
sha256 of a frame's data). So every field is covered: type, id, trial id, sender, receiver, body (a
chunk's transfer id, digest, hop), sequence number. Unsigned envelopes are v1 as before.

``Authenticator.check`` is what a receiver in a secure trial runs before anything else; it raises
``ProtocolError`` (the guard's rejection) when a message is unsigned, signed by a key it does not trust,
wrongly signed, addressed to someone else, a command from someone other than the coordinator, or a
replay: a sequence number more than ``WINDOW_S`` older than the sender's newest, or one seen more than
``DUPLICATE_S`` ago (a QoS 1 duplicate comes within seconds and is left to the idempotent handlers).
Status messages are exempt: the broker's ACL lets only their owner write them (and a last will cannot
carry a fresh signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from dataclasses import replace
from typing import Protocol

from edge_agent.protocol.envelope import BROADCAST, Envelope, canonical_json
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.topics import COORDINATOR

WINDOW_S = 120.0  # reordering tolerated between two messages of one sender (reconnect resends, queues)
DUPLICATE_S = 60.0  # the same message again later than this after it was first accepted: a replay
COMMANDS = frozenset({MessageType.ASSIGN, MessageType.ABORT, MessageType.SHUTDOWN, MessageType.HAND_OFF})
UNSIGNED_OK = frozenset({MessageType.STATUS})
_MAX_SEEN = 16384


class Signer(Protocol):
    def sign(self, message: bytes) -> bytes: ...


class Verifier(Protocol):
    def verify(self, name: str, message: bytes, signature: bytes) -> bool:
        """True only if ``name`` is trusted and ``signature`` is its signature of ``message``."""


def signed_bytes(env: Envelope) -> bytes:
    """What the signature covers: the header (``seq`` included, ``sig`` not) and the data's digest."""
    head = env.header()
    head.pop("sig", None)
    if env.data is not None:
        head["data_sha256"] = hashlib.sha256(env.data).hexdigest()
    return canonical_json(head)


class SequenceNumbers:
    """A sender's sequence numbers: increasing, and at least the wall time in microseconds."""

    def __init__(self) -> None:
        self.last = 0

    def next(self, now: float) -> int:
        self.last = max(self.last + 1, int(now * 1e6))
        return self.last


def sign(env: Envelope, signer: Signer, seq: int) -> Envelope:
    numbered = replace(env, seq=seq, sig=None)
    return replace(numbered, sig=base64.b64encode(signer.sign(signed_bytes(numbered))).decode())


class Authenticator:
    """The receiver's checks of signed envelopes (see the module doc)."""

    def __init__(self, me: str, verifier: Verifier) -> None:
        self.me, self.verifier = me, verifier
        self.newest: dict[str, int] = {}  # sender -> highest sequence number accepted
        self.seen: OrderedDict[tuple[str, int], float] = OrderedDict()  # (sender, seq) -> when first accepted

    def check(self, env: Envelope, now: float) -> None:
        if env.type in UNSIGNED_OK and env.sig is None:
            return
        if env.sig is None or env.seq is None:
            raise ProtocolError(
                "unsigned", f"{env.type} from {env.src!r} is not signed; this trial requires signatures"
            )
        if not self.verifier.verify(env.src, signed_bytes(env), _signature(env.sig)):
            raise ProtocolError("bad_signature", f"{env.type} {env.id} is not signed by {env.src!r} (forged, altered "
                                                 "or from a key this participant does not trust)")  # fmt: skip
        if env.dst not in (self.me, BROADCAST):
            raise ProtocolError("misrouted", f"signed {env.type} is for {env.dst!r}, not {self.me!r} (replayed?)")
        if env.type in COMMANDS and env.src != COORDINATOR and self.me != COORDINATOR:
            raise ProtocolError("not_allowed", f"{env.src!r} may not send {env.type}: only the coordinator commands")
        self._check_replay(env.src, env.seq, now)

    def _check_replay(self, src: str, seq: int, now: float) -> None:
        newest = self.newest.get(src, seq)
        if seq < newest - int(WINDOW_S * 1e6):
            raise ProtocolError("replay", f"sequence number {seq} from {src!r} is {(newest - seq) / 1e6:.0f} s "
                                          f"older than its newest ({newest}): a replay")  # fmt: skip
        first = self.seen.get((src, seq))
        if first is not None and now - first > DUPLICATE_S:
            raise ProtocolError("replay", f"message {seq} from {src!r} was accepted {now - first:.0f} s ago: a replay")
        if first is None:
            self.seen[(src, seq)] = now
            while len(self.seen) > _MAX_SEEN:
                self.seen.popitem(last=False)
        self.newest[src] = max(newest, seq)


def _signature(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_signature", "signature is not base64") from None
