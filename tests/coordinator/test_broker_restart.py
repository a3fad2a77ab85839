"""A broker that restarts: the generated persistence settings, what survives a clean restart and a SIGKILL,
and MqttLink reconnecting (with backoff, longer than its backoff) and delivering what was published meanwhile."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest

from coordinator.broker import BrokerError, RunningBroker, find_mosquitto, start_broker
from coordinator.mosquitto import QUEUE_BYTES, QUEUE_MESSAGES, MosquittoConfig
from edge_agent.mqtt import RECONNECT_MAX_S, MqttLink, parse_broker_url
from edge_agent.protocol.transfer import DEFAULT_CHUNK_BYTES

needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None, reason="mosquitto not installed (apt-get install mosquitto)"
)


def test_generated_config_keeps_persistent_sessions_and_room_for_a_model_in_flight(tmp_path: Path) -> None:
    text = MosquittoConfig(1884, "127.0.0.1", 16 << 20, tmp_path / "db", autosave_s=5).text()
    lines = set(text.splitlines())
    assert {"persistence true", f"persistence_location {tmp_path / 'db'}/", "autosave_interval 5"} <= lines
    assert "listener 1884 127.0.0.1" in lines and "max_packet_size 16777216" in lines
    # a receiver that is offline (or slow) gets the whole of the largest transfer the protocol accepts
    # (2 GiB), twice (a resend while the first copy waits), even in the smallest chunks allowed (4 KiB)
    assert f"max_queued_bytes {QUEUE_BYTES}" in lines and QUEUE_BYTES >= 2 * (2 << 30)
    assert f"max_queued_messages {QUEUE_MESSAGES}" in lines and QUEUE_MESSAGES * 4096 >= QUEUE_BYTES
    assert QUEUE_MESSAGES >= 2 * (2 << 30) // DEFAULT_CHUNK_BYTES
    assert not any(line.startswith("user ") for line in lines)
    as_root = MosquittoConfig(1884, "127.0.0.1", 1 << 20, tmp_path, run_as="root").text()
    assert "user root" in as_root.splitlines()


def test_only_mosquitto_restarts() -> None:
    with start_broker("amqtt") as broker, pytest.raises(BrokerError, match="only a running mosquitto"):
        broker.restart()


def _queue_for_offline_client(broker: RunningBroker, client_id: str, count: int) -> None:
    url = parse_broker_url(broker.url)
    rx = MqttLink(url, client_id, ["restart/queue"], clean_session=False)
    rx.start(timeout=5)
    rx.stop()  # its session stays, subscribed: the broker queues for it
    tx = MqttLink(url, f"tx-{client_id}")
    tx.start(timeout=5)
    for i in range(count):
        tx.publish("restart/queue", b"m%d" % i)
    assert tx.wait_published(10)
    tx.stop()


def _collect(broker: RunningBroker, client_id: str) -> list[bytes]:
    rx = MqttLink(parse_broker_url(broker.url), client_id, ["restart/queue"], clean_session=False)
    rx.start(timeout=5)
    got, wait = [], 3.0
    while (msg := rx.get(timeout=wait)) is not None:
        got.append(msg.payload)
        wait = 0.5
    rx.stop()
    return got


@pytest.mark.broker
@pytest.mark.timeout(60)
@needs_mosquitto
@pytest.mark.parametrize(
    ("kill", "autosave_s", "survives"),
    [(False, 3600, True), (True, 3600, False), (True, 2, True)],
    ids=["sigterm", "sigkill-before-autosave", "sigkill-after-autosave"],
)
def test_queued_messages_for_an_offline_session_across_a_restart(
    tmp_path: Path, kill: bool, autosave_s: int, survives: bool
) -> None:
    """SIGTERM: mosquitto saves its database, the queue survives. SIGKILL: it comes back from its last
    autosave, so a queue no autosave has seen is gone and one saved since survives."""
    with start_broker("mosquitto", workdir=tmp_path, autosave_s=autosave_s) as broker:
        port, pid = broker.port, broker.pid
        client = f"offline-{uuid.uuid4().hex[:6]}"
        _queue_for_offline_client(broker, client, 20)
        if autosave_s < 60:  # wait for an autosave that began after the queue was complete (a loaded machine)
            time.sleep(0.1)
            queued = time.time()
            deadline = queued + 6 * autosave_s
            while time.time() < deadline and not any(
                p.stat().st_mtime > queued for p in tmp_path.rglob("mosquitto.db")
            ):
                time.sleep(0.1)
        broker.restart(kill=kill)
        assert broker.port == port and broker.pid != pid
        expected = [b"m%d" % i for i in range(20)] if survives else []
        assert _collect(broker, client) == expected


@pytest.mark.broker
@pytest.mark.timeout(90)
@needs_mosquitto
def test_links_reconnect_after_a_long_outage_and_deliver_what_was_published_meanwhile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Down longer than the longest backoff: both links come back by themselves, the 30 publishes made while
    the broker was down are delivered once each, the sender's wait_published sees every PUBACK, and the
    receiver's retained birth message says ``online`` again although the restart published its will."""
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    with start_broker("mosquitto", workdir=tmp_path) as broker:
        url = parse_broker_url(broker.url)
        rx = MqttLink(url, "rx-agent", ["restart/inbox"], will=("restart/status", b"offline", True),
                      birth=("restart/status", b"online", True))  # fmt: skip
        tx = MqttLink(url, "tx-agent")
        rx.start(timeout=5)
        tx.start(timeout=5)
        try:
            broker.process.stop()  # type: ignore[union-attr]  (a mosquitto broker has a process)
            for i in range(30):
                tx.publish("restart/inbox", b"p%d" % i)
            time.sleep(RECONNECT_MAX_S + 3)
            assert not tx.connected and not tx.wait_published(0.1)
            back = time.monotonic()
            assert broker.process.start()  # type: ignore[union-attr]
            assert tx.wait_published(3 * RECONNECT_MAX_S)
            got: list[bytes] = []
            while (msg := rx.get(timeout=1.0 if got else 3.0 * RECONNECT_MAX_S)) is not None:
                got.append(msg.payload)
            assert time.monotonic() - back < 2 * RECONNECT_MAX_S + 5
            assert sorted(got) == sorted(b"p%d" % i for i in range(30))
            assert rx.reconnects == 1 and tx.reconnects == 1
        finally:
            tx.stop()
            rx.stop()
        observer = MqttLink(url, "observer", ["restart/status"])
        observer.start(timeout=5)
        status = observer.get(timeout=5)
        observer.stop()
        assert status is not None and status.payload == b"online"
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_agent.mqtt"]
    assert any("cannot reach the broker" in w and "Connection refused" in w for w in warnings)
    assert any("tx-agent is back" in w and "session resumed" in w for w in warnings)


@pytest.mark.broker
@pytest.mark.timeout(60)
@needs_mosquitto
def test_a_finished_coordinator_leaves_no_session_queueing_for_nobody(mosquitto: RunningBroker) -> None:
    """The coordinator's session is persistent while it runs and ends when its link stops; a session kept
    without ``forget_session_on_stop`` (an agent's) still has what was published meanwhile."""
    url, topic = parse_broker_url(mosquitto.url), f"restart/inbox-{uuid.uuid4().hex[:6]}"
    for forget in (True, False):
        client = f"session-{forget}-{uuid.uuid4().hex[:6]}"
        link = MqttLink(url, client, [topic], clean_session=False, forget_session_on_stop=forget)
        link.start(timeout=5)
        link.stop()
        tx = MqttLink(url, f"tx-{client}")
        tx.start(timeout=5)
        tx.publish(topic, b"for whoever comes back")
        assert tx.wait_published(5)
        tx.stop()
        again = MqttLink(url, client, [topic], clean_session=False)
        again.start(timeout=5)
        queued = again.get(timeout=2.0)
        again.stop()
        assert (queued is None) == forget, forget
