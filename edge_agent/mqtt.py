"""The one paho-mqtt adapter: a threaded MQTT 3.1.1 ``Link`` (edge_agent.link) with a receive queue.

paho's network thread only enqueues (callbacks never do work, never raise into the loop), so a slow
consumer cannot stall keepalive. Publishes are QoS 1: paho queues them and sends at most
``MAX_INFLIGHT`` at a time; ``wait_published`` waits for the PUBACKs. Subscriptions are (re)made on
every CONNACK, so reconnects keep them.

Both directions hold a bounded amount of a large transfer (flow control, not a protocol change):

- a publish waits while ``window_bytes`` of earlier publishes await their PUBACK, so frames encoded on
  demand (``protocol.transfer.Frame``) are made as fast as the broker takes them;
- paho's thread waits before it queues a message while ``inbox_bytes`` wait for the consumer, so it
  stops reading the socket and TCP holds the rest back to the broker, which queues it.

Both waits are short (``FLOW_WAIT_S``, then the message goes through anyway), neither happens while
the other is under way (a service that publishes and consumes in one thread cannot lock itself up),
and paho's thread never waits for its own PUBACKs. While the broker is away a publish does not wait
(paho queues it, as before: a transfer begun during an outage is held whole until the reconnect). mosquitto 2.0.11's ``max_inflight_messages`` was
measured not to bound a consumer that acknowledges as it goes (54 frames of 1 MiB queued with the
default 20), hence the wait on our side.

A lost broker is never fatal once started: paho reconnects with backoff (``RECONNECT_MIN_S`` doubling
up to ``RECONNECT_MAX_S``, for as long as it takes), each failed attempt is logged at WARNING with its
reason, publishes made meanwhile wait in paho's queue and go out after the reconnect (QoS 1 messages
that were in flight are sent again, flagged DUP). An optional ``birth`` message (an agent's retained
``online`` status) is published on every connect: a broker that restarts publishes the last wills of
the clients it drops, so the status would otherwise stay ``offline`` after the client is back.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import LinkError
from edge_agent.link import Incoming, LinkCounters
from edge_agent.tls import TlsFiles, context, diagnose

logger = logging.getLogger(__name__)

PASSWORD_ENV = "SNAKE_MQTT_PASSWORD"
MAX_INFLIGHT = 8  # paho copies a message into a packet only when it goes in flight: this bounds the copies
WINDOW_BYTES = 16 << 20  # a publish waits while this much awaits PUBACKs (the sender's bounded buffer)
INBOX_BYTES = 16 << 20  # paho's thread waits while this much waits for the consumer (the receiver's)
FLOW_WAIT_S = 2.0  # the longest either waits at once (a broker that is away, a consumer that is stuck)
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
RECONNECT_MIN_S = 1  # paho's backoff: the first retry after this, doubling up to RECONNECT_MAX_S
RECONNECT_MAX_S = 8  # a broker that is back is found within this (paho never stops retrying)


class _PahoLevels(logging.Filter):
    """paho logs a lost or refused connection at ERROR; the link reconnects and reports it itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_PahoLevels())


@dataclass(frozen=True, repr=False)
class BrokerUrl:
    """Where the broker is; printing it never shows the password."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    def __str__(self) -> str:
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"BrokerUrl({str(self)!r})"


def parse_broker_url(text: str, username: str | None = None, password: str | None = None) -> BrokerUrl:
    """Parse ``mqtt[s]://[user[:password]@]host[:port]``; the password may come from $SNAKE_MQTT_PASSWORD.

    ``username``/``password`` (from a config file and a secret file) fill in what the URL leaves out; a URL
    that names a different user is refused rather than silently overridden."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise LinkError(f"bad broker URL {_redact(text)!r}: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise LinkError(f"bad broker URL {_redact(text)!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise LinkError(f"bad broker URL {_redact(text)!r}: no host (expected mqtt://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LinkError(f"bad broker URL {_redact(text)!r}: unexpected path or query after host:port")
    if port == 0:
        raise LinkError(f"bad broker URL {_redact(text)!r}: port 0")
    url_user = unquote(parts.username) if parts.username is not None else None
    if url_user is not None and username is not None and url_user != username:
        raise LinkError(f"broker URL {_redact(text)!r} names user {url_user!r} but the config says {username!r}")
    username = url_user if url_user is not None else username
    if parts.password is not None:
        password = unquote(parts.password)
    if password is not None and username is None:
        raise LinkError(
            "a broker password was given but no user name: put it in the URL (mqtt://USER@host:port) or set username"
        )
    if password is None and username is not None:
        password = os.environ.get(PASSWORD_ENV) or None
    return BrokerUrl(parts.hostname, port or _DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts", username, password)


def _redact(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


class MqttLink:
    """A connected MQTT client: ``start``, ``publish``, ``get``, ``wait_published``, ``stop``."""

    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        subscriptions: Sequence[str] = (),
        will: tuple[str, bytes, bool] | None = None,
        clean_session: bool = False,
        birth: tuple[str, bytes, bool] | None = None,
        forget_session_on_stop: bool = False,
        keepalive: int = 30,
        max_queue: int = 10000,
        window_bytes: int = WINDOW_BYTES,
        inbox_bytes: int = INBOX_BYTES,
        tls_files: TlsFiles | None = None,
    ) -> None:
        if tls_files is not None and not url.tls:
            raise LinkError(f"TLS files were given but the broker URL {url} is not mqtts://: use mqtts://")
        self.url = url
        self.tls_files = tls_files
        self.client_id = client_id
        self.bytes_sent = 0
        self.bytes_received = 0
        self.dropped = 0
        self._subscriptions = tuple(subscriptions)
        self._keepalive = keepalive
        self._window, self._inbox_budget = window_bytes, inbox_bytes
        self._stopping = False  # set by stop(): no flow-control waits from then on
        self._queued = 0  # bytes in self._inbox
        self._tx_waiters = 0  # threads waiting for PUBACKs (a publish over the window, wait_published)
        self._rx_waiting = False  # paho's thread waits for get()
        self._inbox: queue.Queue[Incoming] = queue.Queue(maxsize=max_queue)
        self._loop_thread: int | None = None
        self._connack = threading.Event()
        self._subacked = threading.Event()
        self._refusal: str | None = None
        self._tls_failed = False
        self._acks = threading.Condition()
        self._pending: dict[int, int] = {}  # mid -> bytes, until its PUBACK
        self._unacked = 0  # bytes in self._pending
        self._early_acks: set[int] = set()
        self._birth = birth
        self._clean_session = clean_session
        self._forget_on_stop = forget_session_on_stop and not clean_session
        self._lost_at: float | None = None  # monotonic time the connection was lost (None: connected or never)
        self._failed_attempts = 0
        self.reconnects = 0
        self._client = self._make_client(will, clean_session)

    def _make_client(self, will: tuple[str, bytes, bool] | None, clean_session: bool) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        client.suppress_exceptions = True  # an error in a callback is logged, never kills the loop
        client.enable_logger(_PAHO_LOG)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # unlimited: a burst of chunks is queued, not dropped
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        if self.url.username is not None:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set_context(context(self.tls_files))
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    # ------------------------------------------------------------ lifecycle

    @property
    def name(self) -> str:
        return str(self.url)

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def counters(self) -> LinkCounters:
        return LinkCounters(self.bytes_sent, self.bytes_received, self.dropped)

    def subscribe(self, pattern: str) -> None:
        """Subscribe now if connected; every reconnect subscribes again."""
        if pattern in self._subscriptions:
            return
        self._subscriptions = (*self._subscriptions, pattern)
        if self.connected:
            self._client.subscribe(pattern, qos=1)

    def start(self, timeout: float = 10.0) -> None:
        """Connect (retrying in the background), wait for the first CONNACK and SUBACK; LinkError if none comes."""
        deadline = time.monotonic() + timeout
        self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
        self._client.loop_start()
        acked = self._connack.wait(timeout) and not self._tls_failed
        acked = acked and self._subacked.wait(max(0.0, deadline - time.monotonic()))
        if acked and self._refusal is None:
            logger.info("connected to %s as %s", self.url, self.client_id)
            return
        reason = self._refusal or diagnose(self.url.host, self.url.port, self.url.tls, self.tls_files)
        reason = reason or self._probe(timeout)
        self.stop()
        raise LinkError(f"cannot connect to {self.url} as {self.client_id!r} within {timeout:g}s: {reason}")

    def _probe(self, timeout: float) -> str:
        try:
            with socket.create_connection((self.url.host, self.url.port), timeout=min(timeout, 2.0)):
                return "TCP connects but the broker sent no CONNACK"
        except OSError as exc:
            return f"TCP connect failed ({exc}); is the broker running and reachable?"

    def stop(self) -> None:
        """Disconnect cleanly (the last will is NOT published) and stop the network thread."""
        with self._acks:  # nobody reads the inbox any more: paho's thread must not hold messages back for it
            self._stopping = True
            self._acks.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        # paho 2.1 leaves loop_start's wake-up socket pair open until the client is garbage collected
        reset_sockets = getattr(self._client, "_reset_sockets", None)
        if reset_sockets is not None:
            reset_sockets(sockpair_only=True)
        if self._forget_on_stop and self._connack.is_set() and self._refusal is None:
            self.forget_session()
        logger.info(
            "link %s to %s stopped (sent %d B, received %d B)",
            self.client_id,
            self.url,
            self.bytes_sent,
            self.bytes_received,
        )

    def forget_session(self, timeout: float = 5.0) -> bool:
        """Have the broker drop this client id's persistent session and its queue (connect once with a clean
        session); without it a finished client's session keeps queueing what matches its subscriptions."""
        cleaner = MqttLink(self.url, self.client_id, clean_session=True, tls_files=self.tls_files)
        try:
            cleaner.start(timeout)
        except LinkError as exc:
            logger.warning("could not end the session of %s on %s: %s", self.client_id, self.url, exc)
            return False
        cleaner.stop()
        return True

    # ------------------------------------------------------------ traffic

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 publish (paho's thread sends it, also after a reconnect); waits first while
        ``window_bytes`` await their PUBACK, at most ``FLOW_WAIT_S``."""
        self._wait_for_room(len(payload))
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish to {topic} refused by the client: {paho.error_string(info.rc)}")
        self.bytes_sent += len(payload)
        with self._acks:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._pending[info.mid] = len(payload)
                self._unacked += len(payload)
        logger.debug("queued %d B to %s (mid %d)", len(payload), topic, info.mid)

    def _wait_for_room(self, size: int) -> None:
        if threading.get_ident() == self._loop_thread:
            return  # paho's thread (a birth message on connect) must never wait for its own PUBACKs
        deadline = time.monotonic() + FLOW_WAIT_S
        with self._acks:
            self._tx_waiters += 1
            try:
                while self._unacked + size > self._window and self._unacked and not self._rx_waiting and self.connected:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        logger.debug("link %s: %d B await PUBACKs; queueing more", self.client_id, self._unacked)
                        break
                    self._acks.notify_all()  # paho's thread, waiting for get(), stops waiting: it reads PUBACKs
                    self._acks.wait(remaining)
            finally:
                self._tx_waiters -= 1

    def _wait_for_consumer(self) -> None:
        """In paho's thread: hold back while the inbox is over budget (TCP then holds the rest back)."""
        deadline = time.monotonic() + FLOW_WAIT_S
        with self._acks:
            while self._queued > self._inbox_budget and not self._tx_waiters and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._rx_waiting = True
                self._acks.notify_all()  # a publish waiting for PUBACKs (which this thread reads) stops waiting
                self._acks.wait(remaining)
            self._rx_waiting = False

    def wait_published(self, timeout: float) -> bool:
        """True once the broker has acknowledged every publish so far; False on timeout. Meanwhile paho's
        thread does not hold back for the inbox budget (it reads the PUBACKs this waits for)."""
        deadline = time.monotonic() + timeout
        with self._acks:
            self._tx_waiters += 1
            self._acks.notify_all()
            try:
                while self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._acks.wait(remaining)
            finally:
                self._tx_waiters -= 1
        return True

    def get(self, timeout: float | None = None) -> Incoming | None:
        """The next received message, or None after ``timeout`` seconds (None: wait forever)."""
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._acks:
            self._queued -= len(message.payload)
            self._acks.notify_all()
        return message

    # ------------------------------------------------------------ paho callbacks (network thread: enqueue only)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refusal = f"broker refused the connection: {reason}"
            logger.warning("broker %s refused %s: %s", self.url, self.client_id, reason)
            self._subacked.set()  # no subscription follows a refusal: start() reports it at once
        else:
            self._refusal, self._loop_thread = None, threading.get_ident()
            self._note_reconnect(bool(getattr(flags, "session_present", False)))
            if self._subscriptions:
                client.subscribe([(topic, 1) for topic in self._subscriptions])
            else:
                self._subacked.set()
            if self._birth is not None:
                self.publish(*self._birth)
        self._connack.set()

    def _note_reconnect(self, session_present: bool) -> None:
        self._failed_attempts = 0
        if self._lost_at is None:
            return
        down, self._lost_at = time.monotonic() - self._lost_at, None
        self.reconnects += 1
        logger.warning(
            "link %s is back on %s after %.1f s (session %s)",
            self.client_id,
            self.url,
            down,
            "resumed" if session_present else "new",
        )
        if not session_present and not self._clean_session:
            logger.warning(
                "the broker at %s had no session for %s (restarted without its database?): messages queued "
                "for it while it was away are lost; it subscribed again and its peers' retries must fill the gap",
                self.url,
                self.client_id,
            )

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the reconnect: the exception is the reason
        reason = sys.exc_info()[1] or "no reason given"
        self._failed_attempts += 1
        if self._lost_at is None and isinstance(reason, ssl.SSLError) and not self._connack.is_set():
            self._tls_failed = True  # a TLS handshake that fails will fail again: start() explains it at once
            self._connack.set()
        if self._lost_at is None:
            return  # before the first CONNACK: start() waits and reports a reason itself
        logger.warning(
            "link %s cannot reach the broker at %s: %s (down %.0f s, attempt %d; retrying every <= %d s)",
            self.client_id,
            self.url,
            reason,
            time.monotonic() - self._lost_at,
            self._failed_attempts,
            RECONNECT_MAX_S,
        )

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = [topic for topic, code in zip(self._subscriptions, reasons, strict=False) if code.is_failure]
        if refused:
            self._refusal = f"broker refused the subscription(s) {refused}"
            logger.warning("broker %s refused subscription(s) of %s: %s", self.url, self.client_id, refused)
        self._subacked.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._acks:
            self._acks.notify_all()  # a publish waiting for room stops waiting: PUBACKs come after a reconnect
        if reason.is_failure:
            if self._lost_at is None:
                self._lost_at = time.monotonic()
            logger.warning(
                "link %s lost its connection to %s (%s); reconnecting, publishes wait in its queue",
                self.client_id,
                self.url,
                "the broker closed it or went away" if str(reason) == "Unspecified error" else reason,
            )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if not any(paho.topic_matches_sub(sub, message.topic) for sub in self._subscriptions):
            # amqtt 0.12.1 sends a new client retained messages for every topic *anyone* subscribed to
            logger.debug(
                "link %s ignored %d B on unsubscribed topic %s", self.client_id, len(message.payload), message.topic
            )
            return
        self._wait_for_consumer()
        with self._acks:
            self._queued += len(message.payload)  # before get() can take it
        try:
            self._inbox.put_nowait(Incoming(message.topic, bytes(message.payload)))
            self.bytes_received += len(message.payload)
        except queue.Full:
            with self._acks:
                self._queued -= len(message.payload)
            self.dropped += 1
            logger.warning(
                "link %s inbox full: dropped %d B on %s", self.client_id, len(message.payload), message.topic
            )

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acks:
            if mid in self._pending:
                self._unacked -= self._pending.pop(mid)
                self._acks.notify_all()
            else:
                self._early_acks.add(mid)
