"""The transport seam: what the agent and coordinator services need from a message link.

``Link`` is implemented by :class:`edge_agent.mqtt.MqttLink` (paho-mqtt, production) and by
:class:`edge_agent.memlink.MemoryLink` (an in-memory broker for tests and large simulations). The
services take whichever they are given. ``Clock`` is the other seam: services read time only through
it, so tests can run a whole trial on a clock they advance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Incoming:
    """One received message."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class LinkCounters:
    """Traffic through a link so far (payload bytes; MQTT framing not included)."""

    bytes_sent: int
    bytes_received: int
    dropped: int  # received but not delivered (inbox full)


class Link(Protocol):
    """A connected publish/subscribe client; QoS 1 semantics (at least once)."""

    @property
    def name(self) -> str:
        """Where the link goes (for log lines; never shows a password)."""

    @property
    def connected(self) -> bool: ...

    def start(self, timeout: float) -> None:
        """Connect and subscribe; raise the adapter's error if that fails within ``timeout`` seconds."""

    def stop(self) -> None:
        """Disconnect cleanly (a last will is not published)."""

    def subscribe(self, pattern: str) -> None:
        """Receive messages on topics matching ``pattern`` (MQTT wildcards), now and after reconnects."""

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a publish. It may wait (MQTT: up to 2 s) while the bytes awaiting acknowledgement exceed the
        link's window, which bounds a large hand-off's memory; it never waits while the broker is down."""

    def get(self, timeout: float | None = None) -> Incoming | None:
        """The next received message, or None after ``timeout`` seconds (None: wait forever)."""

    def wait_published(self, timeout: float) -> bool:
        """True once every publish so far was accepted by the broker; False on timeout."""

    def counters(self) -> LinkCounters: ...


class Clock(Protocol):
    """Wall time (for messages and timers that travel) and a monotonic time (for local deadlines)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to (tests and simulations): both readings advance together."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)
