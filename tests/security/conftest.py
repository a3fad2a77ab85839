"""One provisioned trial directory and its mosquitto (started with the generated config) per session."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from coordinator.broker import RunningBroker, find_mosquitto, free_port  # noqa: E402
from coordinator.provision import ProvisionSpec, provision  # noqa: E402
from coordinator.secure_broker import start_provisioned  # noqa: E402

AGENTS = ("a1", "a2", "a3")


@dataclass
class Secure:
    root: Path
    broker: RunningBroker

    @property
    def port(self) -> int:
        return self.broker.port

    def creds(self, who: str) -> Path:
        return self.root / "coordinator" if who == "coordinator" else self.root / "agents" / who

    def client_args(self, who: str | None, ca: Path | None = None) -> list[str]:
        """mosquitto_pub/sub arguments: TLS to the broker as ``who`` (None: no client certificate)."""
        args = ["-h", "127.0.0.1", "-p", str(self.port), "--cafile", str(ca or self.root / "ca.crt"), "-q", "1"]
        if who is not None:
            home = self.creds(who)
            args += ["--cert", str(home / "client.crt"), "--key", str(home / "client.key")]
        return args


def run_client(tool: str, args: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (apt-get install mosquitto-clients; tools/setup.sh does)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    root = tmp_path_factory.mktemp("provisioned")
    provision(ProvisionSpec(root, AGENTS, ("localhost", "127.0.0.1"), free_port(), "127.0.0.1"))
    broker = start_provisioned(root)
    yield Secure(root, broker)
    broker.stop()
