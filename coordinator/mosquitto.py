"""mosquitto as a child process: its generated config, start, stop (SIGTERM or SIGKILL) and restart.

Stdlib only. Persistence is on: sessions of persistent clients (clean_session=False), their
subscriptions, their queued QoS 1 messages and retained messages are written to a database in the
run directory every ``autosave_s`` seconds and when mosquitto stops on SIGTERM/SIGINT. A restart
reuses the same config file, port and database, so persistent clients find their sessions (and the
messages queued for them) again. After SIGKILL mosquitto restarts from its last autosave: whatever
changed since then is lost (see docs/faults-broker.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
AUTOSAVE_S = 5  # seconds between database saves: what a SIGKILL can lose
# per-client queue beyond the messages in flight: room for the largest transfer the protocol accepts
# (2 GiB) twice over (a resend while the first copy still waits), at the smallest chunk size (4 KiB)
QUEUE_BYTES = 4 << 30
QUEUE_MESSAGES = QUEUE_BYTES // 4096
SESSION_EXPIRY = "2d"  # persistent sessions nobody resumed for this long are dropped (agents of old trials)


@dataclass(frozen=True)
class MosquittoConfig:
    """What goes into the generated ``mosquitto.conf``."""

    port: int
    host: str
    max_packet_bytes: int
    persistence_dir: Path
    major: int = 2
    autosave_s: int = AUTOSAVE_S
    queue_bytes: int = QUEUE_BYTES
    queue_messages: int = QUEUE_MESSAGES
    run_as: str | None = None  # started as root: "root" keeps mosquitto from dropping to a user who cannot write

    @property
    def db_path(self) -> Path:
        return self.persistence_dir / "mosquitto.db"

    def text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.persistence_dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self.autosave_s}",
            f"persistent_client_expiration {SESSION_EXPIRY}",
            f"max_queued_messages {self.queue_messages}",
            f"max_queued_bytes {self.queue_bytes}",
            "log_dest stderr",  # stderr goes to a file we open: works even when mosquitto drops root privileges
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"message_size_limit {self.max_packet_bytes}",
        ]
        if self.major >= 2:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        if self.run_as is not None:
            lines.append(f"user {self.run_as}")
        return "\n".join(lines) + "\n"


def run_as_user() -> str | None:
    """``root`` when we are root, else None (mosquitto runs as us).

    Started as root, mosquitto drops to the ``mosquitto`` user, which cannot reach a run directory under a
    private parent (pytest's temporary directories are 0700): every save then fails with "Permission denied"
    and a restart finds no sessions. A broker on loopback for a trial started as root stays root."""
    return "root" if os.geteuid() == 0 else None


def prepare_persistence(config: MosquittoConfig, fresh: bool) -> None:
    """Create the database directory; ``fresh`` drops a database left there by an earlier broker."""
    config.persistence_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        config.db_path.unlink(missing_ok=True)


def mosquitto_major(exe: Path) -> int:
    try:
        out = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=5).stdout
        return int(out.split("version", 1)[1].strip().split(".", 1)[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return 2


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


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class MosquittoProcess:
    """One mosquitto config on one port; ``start``/``stop`` may alternate (a restart keeps config and port)."""

    def __init__(self, exe: Path, config: MosquittoConfig, conf_path: Path, log_path: Path) -> None:
        self.exe, self.config, self.conf_path, self.log_path = exe, config, conf_path, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Start mosquitto and wait until it accepts a CONNECT; False (and stopped) if it does not."""
        self.conf_path.write_text(self.config.text())
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(self.exe), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it cleanly
            )
        if self._wait_ready(timeout):
            return True
        self.stop()
        return False

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if mqtt_ping(self.config.host, self.config.port, timeout=1.0):
                return True
            time.sleep(0.05)
        return False

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (mosquitto saves its database), SIGKILL after a timeout; ``kill``: SIGKILL at once (no save)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("mosquitto (pid %d) ignored SIGTERM for %gs; killing it", proc.pid, STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()
            return
        tail = log_tail(self.log_path, 4)
        if "Error saving" in tail:
            logger.warning("mosquitto could not save its sessions on stopping; a restart will not find them:\n%s", tail)

    def restart(self, kill: bool = False, down_s: float = 0.0, attempts: int = 5) -> bool:
        """Stop (SIGTERM, or SIGKILL with ``kill``), stay down ``down_s`` seconds, start on the same port again."""
        self.stop(kill=kill)
        time.sleep(down_s)
        for _ in range(attempts):  # the port may still be held for a moment (or taken by someone else)
            if self.start():
                return True
            time.sleep(0.5)
        return False

    def remove_files(self) -> None:
        shutil.rmtree(self.conf_path.parent, ignore_errors=True)
