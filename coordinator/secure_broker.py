"""mosquitto started from a provisioned directory's own config (``DIR/broker/mosquitto.conf``).

The config is the one ``snake-coordinator provision`` wrote (TLS only, client certificates, ACL, CRL,
persistence): it is used as it is, never rewritten, so what runs in tests and ``simulate --secure`` is
what a field broker runs. Restarts reuse it (and its database); a restart also reads a new CRL.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from coordinator.broker import BrokerError, RunningBroker, _register, find_mosquitto
from coordinator.mosquitto import MosquittoConfig, MosquittoProcess, log_tail


class ProvisionedMosquitto(MosquittoProcess):
    """A ``MosquittoProcess`` whose config file is given; ready once its TLS port accepts connections."""

    def __init__(self, exe: Path, conf_path: Path, log_path: Path) -> None:
        text = conf_path.read_text()
        found = re.search(r"^listener (\d+) ?(\S*)", text, re.MULTILINE)
        if found is None:
            raise BrokerError(f"{conf_path} has no listener line; provision again")
        host = found.group(2) or "127.0.0.1"
        config = MosquittoConfig(int(found.group(1)), host, 0, conf_path.parent / "data")
        super().__init__(exe, config, conf_path, log_path)

    def start(self, timeout: float = 10.0) -> bool:
        """Start mosquitto with the provisioned config as it is (the base class would write its own)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(self.exe), "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        if self._wait_ready(timeout):
            return True
        self.stop()
        return False

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                socket.create_connection((self.config.host, self.config.port), timeout=1.0).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False


def start_provisioned(root: Path, log_path: Path | None = None) -> RunningBroker:
    """Start mosquitto with ``root/broker/mosquitto.conf``; its URL is ``mqtts://127.0.0.1:PORT``."""
    exe = find_mosquitto()
    if exe is None:
        raise BrokerError("mosquitto is not installed: `apt-get install mosquitto`")
    conf = root / "broker" / "mosquitto.conf"
    process = ProvisionedMosquitto(exe, conf, log_path or root / "broker" / "mosquitto.log")
    if not process.start():
        raise BrokerError(f"mosquitto did not start with {conf}; its log ends with:\n{log_tail(process.log_path)}")
    url = f"mqtts://{process.config.host}:{process.config.port}"
    return _register(RunningBroker(url, "mosquitto", 0, process.log_path, process, process.stop))
