"""An in-memory MQTT broker and the ``Link`` that talks to it.

It behaves like a real broker where the services can tell: topic filters with wildcards, retained
messages, persistent sessions (messages queue for a client that is away), last wills on an unclean
disconnect, QoS 1 (a publish reaches every matching subscriber, possibly more than once). Faults are
injected per publish (:class:`Faults`): drop, duplicate, delay (which reorders), corrupt, or anything a
test writes. Time comes from a :class:`~edge_agent.link.Clock`: with a ``ManualClock`` a whole trial runs
in one thread, timeouts included, as fast as the code allows.

Pure Python and no I/O; used by the tests and by simulations of many agents.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.link import Clock, Incoming, LinkCounters, ManualClock, topic_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One copy of a publish as the broker will deliver it."""

    payload: bytes
    delay: float = 0.0  # seconds after the publish


Tamper = Callable[[str, bytes], list[Delivery]]


@dataclass
class Faults:
    """Seeded random faults applied to every publish (``only`` limits them to matching topics).

    ``reorder`` is the chance that a message is held back by ``reorder_s`` so later ones overtake it."""

    seed: int = 0
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay_s: tuple[float, float] = (0.0, 0.0)
    reorder: float = 0.0
    reorder_s: float = 0.5
    only: str = "#"
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, topic: str, payload: bytes) -> list[Delivery]:
        if not topic_matches(self.only, topic):
            return [Delivery(payload)]
        rng = self._rng
        if rng.random() < self.drop:
            self._count("dropped")
            return []
        copies = 2 if rng.random() < self.duplicate else 1
        out = []
        for _ in range(copies):
            data = payload
            if payload and rng.random() < self.corrupt:
                self._count("corrupted")
                i = rng.randrange(len(payload))
                data = payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1 :]
            delay = rng.uniform(*self.delay_s)
            if rng.random() < self.reorder:
                self._count("reordered")
                delay += self.reorder_s
            out.append(Delivery(data, delay))
        if copies == 2:
            self._count("duplicated")
        return out

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class _Session:
    subscriptions: list[str] = field(default_factory=list)
    queue: list[tuple[float, int, str, bytes]] = field(default_factory=list)  # heap: (due, order, topic, payload)
    connected: bool = False
    clean: bool = False
    will: tuple[str, bytes, bool] | None = None


class MemoryBroker:
    """Delivers publishes to matching sessions' queues; keeps retained messages and persistent sessions."""

    def __init__(self, clock: Clock | None = None, tamper: Tamper | None = None, record: bool = True) -> None:
        self.clock: Clock = clock or ManualClock()
        self.tamper = tamper
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes]] = []  # every publish as sent, before faults (if ``record``)
        self.record = record
        self._order = itertools.count()
        self._lock = threading.Condition()
        # who may have subscribed to what, so a publish need not try every session's filters (a thousand
        # agents: a thousand sessions); entries may be stale (session gone or renewed): checked on use
        self._exact: dict[str, dict[str, None]] = {}  # topic (a filter without wildcards) -> clients
        self._wildcard: dict[str, None] = {}  # clients that subscribed to a filter with wildcards
        self._waiting: dict[str, None] = {}  # clients with queued messages (due or not)

    # -- sessions --------------------------------------------------------------------------------
    def connect(self, client: str, clean: bool, will: tuple[str, bytes, bool] | None) -> None:
        with self._lock:
            session = self.sessions.get(client)
            if session is None or clean or session.clean:
                session = self.sessions[client] = _Session(clean=clean)
            session.connected, session.will = True, will

    def disconnect(self, client: str, unexpected: bool = False) -> None:
        """A client goes away; an ``unexpected`` loss publishes its last will. Clean sessions are forgotten."""
        with self._lock:
            session = self.sessions.get(client)
            if session is None or not session.connected:
                return
            session.connected = False
            will = session.will if unexpected else None
            if session.clean:
                del self.sessions[client]
        if will is not None:
            self.publish(*will)

    def subscribe(self, client: str, pattern: str) -> None:
        with self._lock:
            session = self.sessions.setdefault(client, _Session())
            if pattern not in session.subscriptions:
                session.subscriptions.append(pattern)
            if "+" in pattern or "#" in pattern:
                self._wildcard[client] = None
            else:
                self._exact.setdefault(pattern, {})[client] = None
            now = self.clock.monotonic()
            if "+" in pattern or "#" in pattern:
                retained = [(t, p) for t, p in self.retained.items() if topic_matches(pattern, t)]
            else:  # a thousand agents each subscribing: no scan of everyone's retained status
                retained = [(pattern, self.retained[pattern])] if pattern in self.retained else []
            for topic, payload in retained:
                heapq.heappush(session.queue, (now, next(self._order), topic, payload))
                self._waiting[client] = None

    # -- traffic ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        deliveries = self.tamper(topic, payload) if self.tamper else [Delivery(payload)]
        with self._lock:
            if self.record:
                self.published.append((topic, payload))
            if retain:
                self.retained[topic] = payload
            now = self.clock.monotonic()
            for client, session in self._subscribers(topic):
                for d in deliveries:
                    heapq.heappush(session.queue, (now + d.delay, next(self._order), topic, d.payload))
                self._waiting[client] = None
            self._lock.notify_all()

    def _subscribers(self, topic: str) -> list[tuple[str, _Session]]:
        """The clients whose session has a filter matching ``topic`` (each once), from the index."""
        found: dict[str, _Session] = {}
        for client in (*self._exact.get(topic, ()), *self._wildcard):
            session = self.sessions.get(client)
            if session is not None and client not in found:
                if any(topic_matches(p, topic) for p in session.subscriptions):
                    found[client] = session
        return list(found.items())

    def take(self, client: str, timeout: float | None = None) -> Incoming | None:
        """The client's next due message. Waits (real time) only on a real clock."""
        with self._lock:
            while True:
                session = self.sessions.get(client)
                if session is not None and session.connected and session.queue:
                    if session.queue[0][0] <= self.clock.monotonic():
                        _, _, topic, payload = heapq.heappop(session.queue)
                        if not session.queue:
                            self._waiting.pop(client, None)
                        return Incoming(topic, payload)
                if isinstance(self.clock, ManualClock) or timeout == 0:
                    return None
                if not self._lock.wait(0.01 if timeout is None else min(timeout, 0.01)):
                    if timeout is not None:
                        timeout -= 0.01
                        if timeout <= 0:
                            return None

    def ready(self) -> list[str]:
        """The connected clients with a message they could take now (a simulation polls only those)."""
        with self._lock:
            now, out = self.clock.monotonic(), []
            for client in list(self._waiting):
                session = self.sessions.get(client)
                if session is None or not session.queue:
                    del self._waiting[client]
                elif session.connected and session.queue[0][0] <= now:
                    out.append(client)
            return out

    def queued(self) -> int:
        """Messages waiting in connected sessions (due or not)."""
        with self._lock:
            return sum(len(s.queue) for s in self.sessions.values() if s.connected)

    def next_due(self) -> float | None:
        """When the earliest waiting message becomes deliverable (monotonic clock), or None."""
        with self._lock:
            dues = [s.queue[0][0] for s in self.sessions.values() if s.connected and s.queue]
        return min(dues) if dues else None


class MemoryLink:
    """A :class:`~edge_agent.link.Link` to a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        subscriptions: tuple[str, ...] | list[str] = (),
        will: tuple[str, bytes, bool] | None = None,
        clean_session: bool = False,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self._subscriptions = list(subscriptions)
        self._will = will
        self._clean = clean_session
        self._connected = False
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def name(self) -> str:
        return f"memory://{self.client_id}"

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, timeout: float = 0.0) -> None:
        self.broker.connect(self.client_id, self._clean, self._will)
        for pattern in self._subscriptions:
            self.broker.subscribe(self.client_id, pattern)
        self._connected = True

    def stop(self) -> None:
        self._connected = False
        self.broker.disconnect(self.client_id)

    def crash(self) -> None:
        """Vanish without a DISCONNECT (the broker publishes the last will)."""
        self._connected = False
        self.broker.disconnect(self.client_id, unexpected=True)

    def subscribe(self, pattern: str) -> None:
        self._subscriptions.append(pattern)
        if self._connected:
            self.broker.subscribe(self.client_id, pattern)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if not self._connected:
            log.debug("%s: publish to %s while disconnected; dropped", self.client_id, topic)
            return
        self.bytes_sent += len(payload)
        self.broker.publish(topic, payload, retain)

    def get(self, timeout: float | None = None) -> Incoming | None:
        msg = self.broker.take(self.client_id, timeout) if self._connected else None
        if msg is not None:
            self.bytes_received += len(msg.payload)
        return msg

    def wait_published(self, timeout: float) -> bool:
        return True  # the broker takes a publish at once

    def counters(self) -> LinkCounters:
        return LinkCounters(self.bytes_sent, self.bytes_received, 0)
