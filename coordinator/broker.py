"""Starts a local MQTT broker on loopback: mosquitto from a generated config, else amqtt in-process.

Stdlib only at import time (amqtt is imported when an embedded broker is started). Every broker
started here is stopped by ``RunningBroker.stop()``, by leaving its ``with`` block, or at interpreter
exit (atexit), so an interrupted CLI leaves no broker behind.

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
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from coordinator.errors import CoordinatorError
from edge_agent.exitcodes import ExitCode

logger = logging.getLogger(__name__)

MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
START_TIMEOUT_S = 10.0
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
    pid: int | None = None  # the mosquitto process; None for the in-process amqtt broker
    _stopper: Callable[[], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

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
) -> RunningBroker:
    """Start a broker on ``host`` and a free port; ``kind`` is ``auto``, ``mosquitto`` or ``amqtt``."""
    if kind == "auto":
        kind = "mosquitto" if find_mosquitto() else "amqtt"
    if kind == "mosquitto":
        return _register(_start_mosquitto(max_packet_bytes, workdir, host))
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


def mqtt_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if an MQTT 3.1.1 CONNECT to host:port is accepted (CONNACK code 0)."""
    client_id = b"snake-broker-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"\x10" + bytes([len(variable)]) + variable)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return reply == b"\x20\x02\x00\x00"
    except OSError:
        return False


# ---------------------------------------------------------------- mosquitto


def _mosquitto_major(exe: Path) -> int:
    try:
        out = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=5).stdout
        return int(out.split("version", 1)[1].strip().split(".", 1)[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return 2


def _mosquitto_config(port: int, host: str, max_packet_bytes: int, major: int) -> str:
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        "log_dest stderr",  # stderr goes to a file we open: works even when mosquitto drops root privileges
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"message_size_limit {max_packet_bytes}",
    ]
    if major >= 2:
        lines.append(f"max_packet_size {max_packet_bytes}")
    return "\n".join(lines) + "\n"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_mosquitto(max_packet_bytes: int, workdir: Path | None, host: str) -> RunningBroker:
    exe = find_mosquitto()
    if exe is None:
        raise BrokerError(
            "mosquitto is not installed: `apt-get install mosquitto` (Debian/Ubuntu/Raspberry Pi OS), "
            "or use the embedded broker (kind='amqtt')"
        )
    tmp = Path(tempfile.mkdtemp(prefix="snake-mosquitto-"))
    logdir = Path(workdir) if workdir is not None else tmp
    logdir.mkdir(parents=True, exist_ok=True)
    major = _mosquitto_major(exe)
    error = ""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(host)
        log_path = logdir / f"mosquitto-{port}.log"
        conf = tmp / "mosquitto.conf"
        conf.write_text(_mosquitto_config(port, host, max_packet_bytes, major))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [str(exe), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it cleanly
            )
        if _wait_ready(proc, host, port):
            logger.info("mosquitto (pid %d) listening on %s:%d, log %s", proc.pid, host, port, log_path)
            stopper = _mosquitto_stopper(proc, tmp)
            url = f"mqtt://{host}:{port}"
            return RunningBroker(url, "mosquitto", max_packet_bytes, log_path, proc.pid, stopper)
        _terminate(proc)
        error = _log_tail(log_path)
        if "in use" not in error:
            break
    shutil.rmtree(tmp, ignore_errors=True)
    raise BrokerError(f"mosquitto failed to start (or not within {START_TIMEOUT_S:g}s); its log ends with:\n{error}")


def _wait_ready(proc: subprocess.Popen[bytes], host: str, port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if mqtt_ping(host, port, timeout=1.0):
            return True
        time.sleep(0.05)
    return False


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("mosquitto (pid %d) ignored SIGTERM for %gs; killing it", proc.pid, STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()


def _mosquitto_stopper(proc: subprocess.Popen[bytes], tmp: Path) -> Callable[[], None]:
    def stop() -> None:
        _terminate(proc)
        shutil.rmtree(tmp, ignore_errors=True)

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
