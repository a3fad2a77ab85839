"""Tools for injecting faults into a running trial by hand: watch its traffic, kill and restart its processes.

Used by ``tools/chaos.py`` and the fault tests. Everything here acts on real processes and a real broker:
``Watch`` subscribes to ``snake/#`` with its own paho client and hands every decodable envelope to a
callback (from paho's thread); ``AgentProcess`` finds an agent process by its cache directory (unique per
run), kills it with SIGKILL and starts it again with the same command line, appending to its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, decode
from edge_agent.protocol.errors import ProtocolError


class Watch:
    """Every envelope published under ``snake/`` goes to ``on_envelope(topic, env)`` (paho's thread)."""

    def __init__(self, port: int, on_envelope: Callable[[str, Envelope], None], name: str = "fault-watch") -> None:
        self.on_envelope = on_envelope
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{topics.ROOT}/#", qos=0)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            env = decode(bytes(msg.payload))
        except ProtocolError:
            return
        try:
            self.on_envelope(msg.topic, env)
        except Exception:  # a watcher's bug must not stop paho's thread
            import logging

            logging.getLogger(__name__).exception("fault watch callback failed")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class AgentProcess:
    """One simulated agent of the run in ``out`` (``simulate`` gives it ``--cache-dir OUT/cache/ID``)."""

    out: Path
    agent_id: str

    @property
    def marker(self) -> str:
        return str(self.out / "cache" / self.agent_id)

    def pid(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"edge_agent.cli" in argv and self.marker.encode() in argv:
                return int(entry.name)
        return None

    def argv(self, pid: int) -> list[str]:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]

    def kill(self) -> list[str] | None:
        """SIGKILL the agent; returns its command line (to start it again), None if it is not running."""
        pid = self.pid()
        if pid is None:
            return None
        argv = self.argv(pid)
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                break
            time.sleep(0.02)
        return argv

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start the agent again (same id, same cache, same data): a new process, its log appended."""
        log_path = self.out / "logs" / f"{self.agent_id}.log"
        with log_path.open("ab") as fh:
            fh.write(b"\n----- restarted by the fault kit -----\n")
            return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ.copy(), start_new_session=True)  # fmt: skip


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
