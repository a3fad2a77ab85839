"""The in-memory broker delivers like a real one from its subscription index: each matching session
once, retained messages on subscribe, nothing to a renewed clean session's old filters; ``ready`` names
exactly the clients with a due message."""

from __future__ import annotations

from edge_agent.link import ManualClock
from edge_agent.memlink import Delivery, MemoryBroker


def drain(broker: MemoryBroker, client: str) -> list[tuple[str, bytes]]:
    out = []
    while (msg := broker.take(client, timeout=0)) is not None:
        out.append((msg.topic, msg.payload))
    return out


def test_exact_and_wildcard_filters_deliver_each_matching_session_once() -> None:
    broker = MemoryBroker(ManualClock())
    for client, filters in {"c": ["s/a/x", "s/+/x"], "d": ["s/#"], "e": ["s/b/x"]}.items():
        broker.connect(client, clean=False, will=None)
        for f in filters:
            broker.subscribe(client, f)
    broker.publish("s/a/x", b"1")
    assert drain(broker, "c") == [("s/a/x", b"1")] and drain(broker, "d") == [("s/a/x", b"1")]
    assert drain(broker, "e") == []


def test_retained_messages_reach_new_subscribers_and_renewed_sessions_forget_old_filters() -> None:
    broker = MemoryBroker(ManualClock())
    broker.publish("s/a/status", b"on", retain=True)
    broker.publish("s/b/status", b"on", retain=True)
    broker.connect("c", clean=True, will=None)
    broker.subscribe("c", "s/a/status")
    broker.connect("w", clean=False, will=None)
    broker.subscribe("w", "s/+/status")
    assert drain(broker, "c") == [("s/a/status", b"on")] and len(drain(broker, "w")) == 2
    broker.disconnect("c")  # clean: the session and its filters are gone
    broker.connect("c", clean=True, will=None)
    broker.publish("s/a/status", b"off")
    assert drain(broker, "c") == []


def test_ready_names_the_clients_with_a_due_message() -> None:
    clock = ManualClock()
    late = {"s/late": [Delivery(b"x", delay=1.0)]}
    broker = MemoryBroker(clock, tamper=lambda topic, payload: late.get(topic, [Delivery(payload)]))
    for client in ("a", "b", "c"):
        broker.connect(client, clean=False, will=None)
        broker.subscribe(client, f"s/{client}")
    broker.subscribe("c", "s/late")
    broker.publish("s/a", b"1")
    broker.publish("s/late", b"1")
    assert broker.ready() == ["a"]  # c's message is not due yet
    clock.advance(1.0)
    assert sorted(broker.ready()) == ["a", "c"]
    drain(broker, "a")
    assert broker.ready() == ["c"]
