"""A provisioned agent process (``snake-agent run --config agent.toml``) on the provisioned broker, attacked
with mosquitto_pub by another agent's credentials; its answers read with mosquitto_sub as the coordinator."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.keys import FileSigner, TrustDir
from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.signing import sign, signed_bytes
from tests.security.conftest import Secure

pytestmark = pytest.mark.broker


def _pub_bytes(secure: Secure, who: str, topic: str, payload: bytes) -> None:
    exe = shutil.which("mosquitto_pub")
    assert exe is not None
    subprocess.run([exe, *secure.client_args(who), "-t", topic, "-s"], input=payload, check=True, timeout=10)


def test_forged_and_unsigned_commands_are_refused_and_answered(secure: Secure, tmp_path: Path) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto-clients is not installed")
    home = secure.creds("a2")
    sub = subprocess.Popen([shutil.which("mosquitto_sub") or "", *secure.client_args("coordinator"), "-t",
                            "snake/v1/coordinator/inbox", "-W", "90", "-i", "test-coordinator-sub"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    log_path = tmp_path / "a2.log"
    with log_path.open("wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(home / "agent.toml"),
                                  "--no-calibrate", "--samples", "64", "--cache-dir", str(tmp_path / "cache")],
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for(log_path, "online at mqtts://")
        inbox = "snake/v1/agents/a2/inbox"
        forger = FileSigner(secure.creds("a1") / "signing.key")
        evil = Envelope(MessageType.ASSIGN, "coordinator", "a2", {"tasks": [], "chunk_bytes": 65536},
                        trial_id="t-evil", created_at=time.time())  # fmt: skip
        _pub_bytes(secure, "a1", inbox, encode(sign(evil, forger, time.time_ns() // 1000)))
        _pub_bytes(secure, "a1", inbox, encode(evil))  # unsigned
        _wait_for(log_path, "is not signed;")
        genuine = FileSigner(secure.creds("coordinator") / "signing.key")
        stop = Envelope(MessageType.SHUTDOWN, "coordinator", "a2", {"reason": "test over", "exit": True})
        _pub_bytes(secure, "coordinator", inbox, encode(sign(stop, genuine, time.time_ns() // 1000)))
        assert agent.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        sub.kill()
    out, _ = sub.communicate(timeout=10)
    log = log_path.read_text()
    assert "t-evil" not in log.split("refused")[0] and "assigned" not in log
    replies = [decode(line) for line in out.splitlines() if line.startswith(b"{")]
    errors = {e.error["code"] for e in replies if e.error and e.src == "a2"}
    assert {"bad_signature", "unsigned"} <= errors
    trust = TrustDir(secure.creds("coordinator") / "trust")  # a2's answers are signed by a2
    assert all(trust.verify("a2", signed_bytes(e), base64.b64decode(e.sig or "")) for e in replies)


def _wait_for(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text() if path.exists() else ''}")
