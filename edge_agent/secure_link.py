"""A ``Link`` that signs what its owner sends and lets through only what its trust accepts.

It wraps any link (MQTT in production, the in-memory one in tests), so neither the pure agent nor the
controller changes: every envelope published from ``me`` is signed (``protocol.signing``) with the next
sequence number; every message received is checked by an ``Authenticator`` first. A refused message is
logged at WARNING with its reason, counted, answered with a signed error reply where the guard would
answer one, and never reaches the owner: it changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.link import Clock, Incoming, Link, LinkCounters
from edge_agent.protocol.envelope import decode, encode
from edge_agent.protocol.errors import ProtocolError, Rejections
from edge_agent.protocol.guard import Guard
from edge_agent.protocol.signing import Authenticator, SequenceNumbers, Signer, Verifier, sign

log = logging.getLogger(__name__)


class SecureLink:
    def __init__(self, inner: Link, me: str, signer: Signer, verifier: Verifier, clock: Clock) -> None:
        self.inner, self.me, self.signer, self.clock = inner, me, signer, clock
        self.auth = Authenticator(me, verifier)
        self.numbers = SequenceNumbers()
        self.guard = Guard(me)  # builds the error replies; its counts are this link's rejections
        self.signed = 0

    @property
    def rejections(self) -> Rejections:
        return self.guard.rejections

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def start(self, timeout: float) -> None:
        self.inner.start(timeout)

    def stop(self) -> None:
        self.inner.stop()

    def subscribe(self, pattern: str) -> None:
        self.inner.subscribe(pattern)

    def counters(self) -> LinkCounters:
        return self.inner.counters()

    def wait_published(self, timeout: float) -> bool:
        return self.inner.wait_published(timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Sign envelopes of ours (anything else, e.g. a relayed payload, goes as it is)."""
        try:
            env = decode(payload)
        except ProtocolError:
            env = None
        if env is not None and env.src == self.me:
            payload = encode(sign(env, self.signer, self.numbers.next(self.clock.time())))
            self.signed += 1
        self.inner.publish(topic, payload, retain)

    def get(self, timeout: float | None = None) -> Incoming | None:
        """The next message that passes the checks (a refused one is answered and skipped)."""
        msg = self.inner.get(timeout)
        while msg is not None:
            if self._accept(msg):
                return msg
            msg = self.inner.get(0.0)
        return None

    def _accept(self, msg: Incoming) -> bool:
        try:
            env = decode(msg.payload)
        except ProtocolError:
            return True  # malformed: the owner's guard refuses it with its reason
        now = self.clock.time()
        try:
            self.auth.check(env, now)
        except ProtocolError as exc:
            self.guard.rejections.add(exc.code)
            log.warning("refused %s %s from %s on %s: %s", env.type, env.id, env.src, msg.topic, exc)
            for out in self.guard.answer(env, exc.code, exc.message, now):
                self.publish(out.topic, out.payload, out.retain)
            return False
        return True


def load_secure_link(inner: Link, me: str, signing_key: Path, trust_dir: Path, clock: Clock) -> SecureLink:
    """The link with the key files of a provisioned participant (needs the ``cryptography`` package)."""
    from edge_agent.keys import FileSigner, TrustDir

    return SecureLink(inner, me, FileSigner(signing_key), TrustDir(trust_dir), clock)
