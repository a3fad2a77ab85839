"""Starts a local MQTT broker on loopback: mosquitto from a generated config, else amqtt in-process.

Stdlib only at import time (amqtt is imported when an embedded broker is started). Every broker
started here is stopped by ``RunningBroker.stop()``, by leaving its ``with`` block, or at interpreter
exit (atexit), so an interrupted CLI leaves no broker behind. A mosquitto broker keeps persistent
sessions in a database in the run directory and can be restarted on the same port
(``RunningBroker.restart``, cleanly or with SIGKILL), which is how the broker-restart tests and chaos
runs take it down mid-trial (coordinator/mosquitto.py says what survives).

amqtt 0.12.1 has no maximum-message-size setting: for it ``max_packet_bytes`` is advisory only
(callers must still chunk below it, which keeps the in-process broker's memory small).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from coordinator.errors import CoordinatorError
from coordinator.mosquitto import (
    AUTOSAVE_S,
    START_TIMEOUT_S,
    MosquittoConfig,
    MosquittoProcess,
    log_tail,
    mosquitto_major,
    mqtt_ping,
    prepare_persistence,
    run_as_user,
)
from edge_agent.exitcodes import ExitCode

logger = logging.getLogger(__name__)

MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 3
_LIVE: set[RunningBroker] = set()
_LIVE_LOCK = threading.Lock()


class BrokerError(CoordinatorError):
    """A local broker could not be started."""

    exit_code: ClassVar[ExitCode] = ExitCode.BROKER


@dataclass(eq=False)
class RunningBroker:
    """A broker started by ``start_broker``; ``stop()`` is idempotent and also runs at exit."""

    url: str
    kind: str
    max_packet_bytes: int
    log_path: Path | None = None
    process: MosquittoProcess | None = field(default=None, repr=False)  # None for the in-process amqtt broker
    _stopper: Callable[[], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        """The mosquitto process (a new one after each restart); None for the in-process amqtt broker."""
        return self.process.pid if self.process is not None else None

    def restart(self, kill: bool = False, down_s: float = 0.0) -> None:
        """Take mosquitto down and start it again from the same config, port and database.

        ``kill=False``: SIGTERM, mosquitto saves its database first (every persistent session and its
        queued messages survive). ``kill=True``: SIGKILL, it comes back from its last autosave. It stays
        down ``down_s`` seconds. BrokerError if it does not come back or this broker cannot restart.
        """
        process = self.process
        if process is None or self._stopper is None:
            raise BrokerError(f"cannot restart the {self.kind} broker at {self.url}: only a running mosquitto can")
        with self._lock:
            how = "SIGKILL" if kill else "SIGTERM"
            logger.warning("restarting mosquitto at %s (%s, down %.1f s)", self.url, how, down_s)
            if not process.restart(kill=kill, down_s=down_s):
                raise BrokerError(f"mosquitto did not come back on {self.url}; log:\n{log_tail(process.log_path)}")
            logger.info("mosquitto (pid %d) is back on %s", process.pid, self.url)

    def stop(self) -> None:
        """Stop the broker (terminate, then kill after a timeout). Safe to call more than once."""
        with self._lock:
            stopper, self._stopper = self._stopper, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if stopper is not None:
            stopper()
            logger.info("stopped %s broker at %s", self.kind, self.url)

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _register(broker: RunningBroker) -> RunningBroker:
    with _LIVE_LOCK:
        _LIVE.add(broker)
    return broker


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for broker in live:
        broker.stop()


def start_broker(
    kind: str = "auto",
    max_packet_bytes: int = 16 * 1024 * 1024,
    workdir: Path | None = None,
    host: str = "127.0.0.1",
    autosave_s: int = AUTOSAVE_S,
) -> RunningBroker:
    """Start a broker on ``host`` and a free port; ``kind`` is ``auto``, ``mosquitto`` or ``amqtt``.

    mosquitto saves its sessions every ``autosave_s`` seconds (what a SIGKILL of the broker can lose)."""
    if kind == "auto":
        kind = "mosquitto" if find_mosquitto() else "amqtt"
    if kind == "mosquitto":
        return _register(_start_mosquitto(max_packet_bytes, workdir, host, autosave_s))
    if kind == "amqtt":
        return _register(_start_amqtt(max_packet_bytes, host))
    raise BrokerError(f"unknown broker kind {kind!r}: use auto, mosquitto or amqtt")


def find_mosquitto() -> Path | None:
    """The mosquitto executable on PATH or in /usr/sbin, if installed."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    return MOSQUITTO_FALLBACK if os.access(MOSQUITTO_FALLBACK, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- mosquitto


def _start_mosquitto(max_packet_bytes: int, workdir: Path | None, host: str, autosave_s: int) -> RunningBroker:
    exe = find_mosquitto()
    if exe is None:
        raise BrokerError(
            "mosquitto is not installed: `apt-get install mosquitto` (Debian/Ubuntu/Raspberry Pi OS), "
            "or use the embedded broker (kind='amqtt')"
        )
    tmp = Path(tempfile.mkdtemp(prefix="snake-mosquitto-"))
    logdir = Path(workdir) if workdir is not None else tmp
    logdir.mkdir(parents=True, exist_ok=True)
    major, run_as = mosquitto_major(exe), run_as_user()
    error = ""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(host)
        persistence = logdir / f"mosquitto-{port}.d"
        config = MosquittoConfig(port, host, max_packet_bytes, persistence, major, autosave_s, run_as=run_as)
        prepare_persistence(config, fresh=True)
        process = MosquittoProcess(exe, config, tmp / "mosquitto.conf", logdir / f"mosquitto-{port}.log")
        if process.start():
            logger.info("mosquitto (pid %d) listening on %s:%d, log %s", process.pid, host, port, process.log_path)
            url = f"mqtt://{host}:{port}"
            return RunningBroker(url, "mosquitto", max_packet_bytes, process.log_path, process, _stopper(process))
        error = log_tail(process.log_path)
        if "in use" not in error:
            break
    shutil.rmtree(tmp, ignore_errors=True)
    raise BrokerError(f"mosquitto failed to start (or not within {START_TIMEOUT_S:g}s); its log ends with:\n{error}")


def _stopper(process: MosquittoProcess) -> Callable[[], None]:
    def stop() -> None:
        process.stop()
        process.remove_files()

    return stop


# ---------------------------------------------------------------- amqtt (embedded, in a thread)


class _AmqttThread(threading.Thread):
    """Runs an amqtt broker on its own asyncio event loop until ``shutdown()``."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(name="amqtt-broker", daemon=True)
        self._config = config
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: Any = None
        self._stop_event: Any = None

    def run(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start_broker, which raises BrokerError
            self.error = exc
        finally:
            self.ready.set()
            _close_loop(loop)

    async def _serve(self) -> None:
        import asyncio

        self._stop_event = asyncio.Event()
        broker = _closing_broker_class()(self._config)
        await broker.start()
        self.ready.set()
        await self._stop_event.wait()
        await broker.shutdown()

    def shutdown(self) -> None:
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed in between: already stopped
                self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(timeout=STOP_TIMEOUT_S)
        if self.is_alive():
            logger.warning("amqtt broker did not stop within %gs", STOP_TIMEOUT_S)


def _closing_broker_class() -> type[Any]:
    """amqtt's Broker, closing each client socket when amqtt is done with it.

    amqtt 0.12.1 leaks the socket (a ResourceWarning later) when a client closes first: its
    ``write_eof()`` then raises ENOTCONN and the writer is never closed.
    """
    import asyncio

    from amqtt.broker import Broker

    class ClosingBroker(Broker):  # type: ignore[misc]
        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                if not writer.transport.is_closing():
                    writer.transport.abort()

    return ClosingBroker


def _close_loop(loop: Any) -> None:
    import asyncio

    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _start_amqtt(max_packet_bytes: int, host: str) -> RunningBroker:
    try:
        import amqtt.broker  # noqa: F401  (fail early with a clear message)
    except ImportError as exc:
        raise BrokerError("neither mosquitto nor amqtt is available: `apt-get install mosquitto`") from exc
    error: BaseException | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(host)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        thread = _AmqttThread(config)
        thread.start()
        thread.ready.wait(START_TIMEOUT_S)
        if thread.error is None and thread.ready.is_set() and mqtt_ping(host, port):
            logger.info("amqtt broker listening on %s:%d (message size not enforced)", host, port)
            return RunningBroker(f"mqtt://{host}:{port}", "amqtt", max_packet_bytes, None, None, thread.shutdown)
        error = thread.error
        thread.shutdown()
    raise BrokerError(f"amqtt broker did not start on {host}: {error!r}") from error
