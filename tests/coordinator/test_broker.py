"""Local brokers: mosquitto from a generated config and the embedded amqtt broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from coordinator import broker as broker_module
from coordinator.broker import BrokerError, RunningBroker, find_mosquitto, mqtt_ping, start_broker
from coordinator.errors import CoordinatorError
from edge_agent.mqtt import Incoming, MqttLink, parse_broker_url

REPO = Path(__file__).resolve().parents[2]
needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto not installed (apt-get install mosquitto)"
)


def _port_is_free(port: int) -> bool:
    """True if a server could listen on the port again (SO_REUSEADDR, as brokers do: TIME_WAIT may linger)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def _round_trip(broker: RunningBroker, payload: bytes) -> Incoming | None:
    url, topic = parse_broker_url(broker.url), f"test/broker/{uuid.uuid4().hex[:8]}"
    rx, tx = MqttLink(url, f"rx-{topic}", (topic,)), MqttLink(url, f"tx-{topic}")
    rx.start(timeout=5)
    tx.start(timeout=5)
    try:
        tx.publish(topic, payload)
        assert tx.wait_published(20)
        return rx.get(timeout=20)
    finally:
        tx.stop()
        rx.stop()


@pytest.mark.broker
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"])
def test_start_round_trip_stop(kind: str, tmp_path: Path) -> None:
    broker = start_broker(kind, max_packet_bytes=8 * 1024 * 1024, workdir=tmp_path)
    assert broker.kind == kind and broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with broker:
        assert mqtt_ping("127.0.0.1", broker.port)
        payload = os.urandom(2 * 1024 * 1024)
        topic_message = _round_trip(broker, payload)
        assert topic_message is not None and topic_message.payload == payload
    assert not mqtt_ping("127.0.0.1", broker.port)
    assert _port_is_free(broker.port)
    broker.stop()  # idempotent


@pytest.mark.broker
@pytest.mark.timeout(60)
@needs_mosquitto
@pytest.mark.expect_errors  # paho logs the reset connection at ERROR
def test_mosquitto_drops_messages_over_the_limit(tmp_path: Path) -> None:
    with start_broker("mosquitto", max_packet_bytes=64 * 1024, workdir=tmp_path) as broker:
        url, topic = parse_broker_url(broker.url), "test/oversize"
        rx, big, small = MqttLink(url, "rx", (topic,)), MqttLink(url, "big"), MqttLink(url, "small")
        for link in (rx, big, small):
            link.start(timeout=5)
        try:
            big.publish(topic, b"x" * (128 * 1024))
            assert rx.get(timeout=2.0) is None  # refused by the broker, never delivered
            small.publish(topic, b"fits")
            assert rx.get(timeout=5) == Incoming(topic, b"fits")  # the broker is still fine
        finally:
            began = time.monotonic()
            for link in (big, small, rx):
                link.stop()
            assert time.monotonic() - began < 5.0  # a link stuck resending still stops
    assert broker.log_path is not None and "oversize packet" in broker.log_path.read_text()


@needs_mosquitto
def test_auto_prefers_mosquitto() -> None:
    with start_broker("auto") as broker:
        assert broker.kind == "mosquitto"


def test_unknown_kind_and_failed_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="auto, mosquitto or amqtt"):
        start_broker("emqx")
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\necho 'Error: cannot start, fake broker' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: fake)
    with pytest.raises(BrokerError, match="(?s)failed to start.*fake broker") as err:
        start_broker("mosquitto", workdir=tmp_path)
    assert isinstance(err.value, CoordinatorError)


_CHILD = textwrap.dedent(
    """
    import sys
    from coordinator.broker import start_broker
    broker = start_broker(sys.argv[1])
    print(broker.port, broker.pid, flush=True)
    if sys.argv[2] == "interrupt":
        raise KeyboardInterrupt
    """
)


@pytest.mark.broker
@pytest.mark.timeout(60)
@needs_mosquitto
@pytest.mark.parametrize("ending", ["exit", "interrupt"])
def test_exit_leaves_no_broker_behind(ending: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "mosquitto", ending], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    port, pid = (int(word) for word in done.stdout.split())
    assert not mqtt_ping("127.0.0.1", port) and _port_is_free(port)
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or b"mosquitto" not in cmdline.read_bytes()


@pytest.mark.broker
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"])
def test_links_see_only_their_subscriptions(kind: str) -> None:
    """amqtt 0.12.1 sends a new client the retained messages of everyone's subscriptions: MqttLink drops them."""
    with start_broker(kind) as broker:
        url = parse_broker_url(broker.url)
        owner = MqttLink(url, "owner", ("status/a",))
        owner.start(timeout=5)
        owner.publish("status/a", b"online", retain=True)
        assert owner.wait_published(5) and owner.get(timeout=5) == Incoming("status/a", b"online")
        other = MqttLink(url, "other", ("inbox/b",))
        other.start(timeout=5)
        try:
            owner.publish("inbox/b", b"hello b")
            assert other.get(timeout=5) == Incoming("inbox/b", b"hello b")
            assert other.get(timeout=0.5) is None
        finally:
            other.stop()
            owner.stop()
