"""The paho adapter: URL parsing, and real traffic through mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from edge_agent.mqtt import BrokerUrl, Incoming, LinkError, MqttLink, parse_broker_url

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- URLs (no broker)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt://127.0.0.1:1884", BrokerUrl("127.0.0.1", 1884, False, None, None)),
        ("mqtt://broker.local", BrokerUrl("broker.local", 1883, False, None, None)),
        ("mqtts://broker.local", BrokerUrl("broker.local", 8883, True, None, None)),
        ("mqtts://ann:s%40cret@h:9000/", BrokerUrl("h", 9000, True, "ann", "s@cret")),
        ("mqtt://[::1]:1999", BrokerUrl("::1", 1999, False, None, None)),
    ],
)
def test_parse_broker_url(text: str, expected: BrokerUrl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAKE_MQTT_PASSWORD", raising=False)
    assert parse_broker_url(text) == expected


def test_password_from_env_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKE_MQTT_PASSWORD", "hunter2")
    url = parse_broker_url("mqtts://agent7@broker:8883")
    assert url.password == "hunter2" and url.username == "agent7"
    assert parse_broker_url("mqtt://host").password is None  # no user: no password
    inline = parse_broker_url("mqtt://u:topsecret@host:1")
    for text in (str(url), repr(url), str(inline), repr(inline), f"{inline}"):
        assert "hunter2" not in text and "topsecret" not in text
    assert str(url) == "mqtts://agent7:***@broker:8883"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("http://host:1883", "scheme"),
        ("host:1883", "scheme"),
        ("mqtt://", "no host"),
        ("mqtt://host:notaport", "bad broker URL"),
        ("mqtt://host:70000", "bad broker URL"),
        ("mqtt://host:1883/topic", "path"),
    ],
)
def test_bad_url_is_a_link_error(text: str, match: str) -> None:
    with pytest.raises(LinkError, match=match):
        parse_broker_url(text)


def test_bad_url_error_redacts_password() -> None:
    with pytest.raises(LinkError) as err:
        parse_broker_url("mqtt://u:topsecret@host:99999")
    assert "topsecret" not in str(err.value)


@pytest.mark.timeout(20)
def test_start_against_closed_port_fails_within_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    link = MqttLink(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "lonely")
    began = time.monotonic()
    with pytest.raises(LinkError, match="refused"):
        link.start(timeout=1.5)
    assert time.monotonic() - began < 5.0
    assert not link.connected


# ---------------------------------------------------------------- real broker


def _topic(kind: str) -> str:
    return f"test/{kind}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def links(mosquitto: RunningBroker) -> Iterator[list[MqttLink]]:
    """Links to stop after the test, whatever happens."""
    started: list[MqttLink] = []
    yield started
    for link in started:
        link.stop()


def _link(
    links: list[MqttLink], broker: RunningBroker, name: str, subs: tuple[str, ...] = (), max_queue: int = 10000
) -> MqttLink:
    link = MqttLink(parse_broker_url(broker.url), f"{name}-{uuid.uuid4().hex[:6]}", subs, max_queue=max_queue)
    link.start(timeout=5)
    links.append(link)
    return link


@pytest.mark.broker
@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 4 * 1024 * 1024])
def test_round_trip(mosquitto: RunningBroker, links: list[MqttLink], size: int) -> None:
    topic = _topic("rt")
    rx = _link(links, mosquitto, "rx", (topic + "/#",))
    tx = _link(links, mosquitto, "tx")
    payload = os.urandom(size)
    tx.publish(topic + "/a", payload)
    assert tx.wait_published(20)
    assert rx.get(timeout=20) == Incoming(topic + "/a", payload)
    assert tx.bytes_sent == size and rx.bytes_received == size
    assert tx.connected and rx.connected


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_burst_of_chunks_is_queued_not_dropped(mosquitto: RunningBroker, links: list[MqttLink]) -> None:
    topic = _topic("burst")
    rx = _link(links, mosquitto, "rx", (topic,))
    tx = _link(links, mosquitto, "tx")
    chunk = os.urandom(1024 * 1024)
    for _ in range(64):
        tx.publish(topic, chunk)
    assert tx.wait_published(30)
    received = [rx.get(timeout=30) for _ in range(64)]
    assert all(m is not None and m.payload == chunk for m in received)


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_flow_control_bounds_what_each_end_holds_and_loses_nothing(
    mosquitto: RunningBroker, links: list[MqttLink]
) -> None:
    """A publish waits while the window awaits PUBACKs; paho's thread waits while the inbox is over its
    budget (TCP and the broker hold the rest). Each wait gives up after FLOW_WAIT_S (2 s): margins of a
    few chunks for a loaded machine."""
    topic, mib, budget = _topic("flow"), 1 << 20, 3 << 20
    rx = MqttLink(parse_broker_url(mosquitto.url), f"rx-{uuid.uuid4().hex[:6]}", (topic,), inbox_bytes=budget)
    tx = MqttLink(parse_broker_url(mosquitto.url), f"tx-{uuid.uuid4().hex[:6]}", (), window_bytes=budget)
    for link in (rx, tx):
        link.start(timeout=5)
        links.append(link)
    chunks = [bytes([i]) * mib for i in range(40)]
    most_unacked = [0]

    def publish_all() -> None:
        for chunk in chunks:
            tx.publish(topic, chunk)
            most_unacked[0] = max(most_unacked[0], tx._unacked)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    received, most_queued = [], 0
    while len(received) < len(chunks) and (message := rx.get(timeout=20)) is not None:
        most_queued = max(most_queued, rx._inbox.qsize())
        received.append(message.payload)
        time.sleep(0.02)  # a consumer slower than the link
    publisher.join(10)
    assert received == chunks and rx.dropped == 0
    assert most_unacked[0] <= budget + 2 * mib
    assert most_queued * mib <= budget + 3 * mib


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_full_inbox_drops_and_keeps_running(mosquitto: RunningBroker, links: list[MqttLink]) -> None:
    topic = _topic("full")
    rx = _link(links, mosquitto, "rx", (topic,), max_queue=2)
    tx = _link(links, mosquitto, "tx")
    for i in range(5):
        tx.publish(topic, bytes([i]))
    assert tx.wait_published(10)
    deadline = time.monotonic() + 10
    while rx.dropped < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rx.dropped == 3 and [rx.get(1), rx.get(1)] == [Incoming(topic, b"\x00"), Incoming(topic, b"\x01")]
    tx.publish(topic, b"later")
    assert rx.get(timeout=10) == Incoming(topic, b"later") and rx.connected


def _latest(link: MqttLink, wait: float) -> bytes | None:
    """The last payload received within ``wait`` seconds."""
    last = None
    deadline = time.monotonic() + wait
    while (message := link.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
        last = message.payload
    return last


_CHILD = textwrap.dedent(
    """
    import sys, time
    from edge_agent.mqtt import MqttLink, parse_broker_url
    url, topic = sys.argv[1], sys.argv[2]
    link = MqttLink(parse_broker_url(url), "child-agent", will=(topic, b"offline", True), keepalive=30)
    link.start(timeout=10)
    link.publish(topic, b"online", retain=True)
    assert link.wait_published(10)
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_last_will_fires_when_client_is_killed(mosquitto: RunningBroker, links: list[MqttLink]) -> None:
    topic = _topic("status")
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, mosquitto.url, topic], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            watcher = _link(links, mosquitto, "watch", (topic,))
            assert watcher.get(timeout=10) == Incoming(topic, b"online")  # retained
            child.send_signal(signal.SIGKILL)
            assert watcher.get(timeout=10) == Incoming(topic, b"offline")  # at once, not after keepalive
        finally:
            child.kill()
    late = _link(links, mosquitto, "late", (topic,))
    assert late.get(timeout=10) == Incoming(topic, b"offline")  # the will was retained


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_clean_stop_does_not_fire_the_will(mosquitto: RunningBroker, links: list[MqttLink]) -> None:
    topic = _topic("status")
    agent = MqttLink(parse_broker_url(mosquitto.url), "clean-agent", will=(topic, b"offline", True))
    agent.start(timeout=5)
    agent.publish(topic, b"online", retain=True)
    assert agent.wait_published(5)
    watcher = _link(links, mosquitto, "watch", (topic,))
    assert watcher.get(timeout=5) == Incoming(topic, b"online")
    agent.stop()
    assert not agent.connected
    assert _latest(watcher, 2.0) is None
    agent_2 = _link(links, mosquitto, "late", (topic,))
    assert agent_2.get(timeout=5) == Incoming(topic, b"online")
