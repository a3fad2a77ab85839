"""The agent's TLS link to a provisioned broker: reconnects after a restart; every TLS mistake is one line
that names the cause and the fix."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from coordinator.pki import (
    cert_pem,
    issue,
    key_pem,
    load_authority,
    new_authority,
    new_key,
    write_private,
    write_public,
)
from edge_agent.errors import LinkError
from edge_agent.exitcodes import ExitCode
from edge_agent.mqtt import MqttLink, parse_broker_url
from edge_agent.protocol import topics
from edge_agent.tls import TlsFiles
from tests.security.conftest import Secure

pytestmark = pytest.mark.broker


def _files(secure: Secure, who: str, ca: Path | None = None) -> TlsFiles | None:
    home = secure.creds(who)
    return TlsFiles.from_fields(ca or secure.root / "ca.crt", home / "client.crt", home / "client.key")


def _link(url: str, files: TlsFiles | None, name: str, subs: tuple[str, ...] = ()) -> MqttLink:
    return MqttLink(parse_broker_url(url), f"test-{name}-{time.monotonic_ns()}", list(subs), tls_files=files)


def _refusal(url: str, files: TlsFiles | None) -> str:
    link = _link(url, files, "bad")
    with pytest.raises(LinkError) as caught:
        link.start(timeout=3.0)
    return str(caught.value)


def test_an_agent_link_reconnects_over_tls_after_a_broker_restart(secure: Secure) -> None:
    inbox = topics.agent_inbox("a2")
    link = _link(f"mqtts://localhost:{secure.port}", _files(secure, "a2"), "a2", (inbox,))
    sender = _link(f"mqtts://127.0.0.1:{secure.port}", _files(secure, "a3"), "a3")
    link.start(timeout=10.0)
    sender.start(timeout=10.0)
    try:
        secure.broker.restart()
        deadline = time.monotonic() + 20
        while not (link.connected and sender.connected) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link.reconnects >= 1 and link.connected
        sender.publish(inbox, b"after the restart")
        got = link.get(timeout=10.0)
        assert got is not None and got.payload == b"after the restart"
    finally:
        link.stop()
        sender.stop()


def test_plain_mqtt_to_the_tls_port_says_use_mqtts(secure: Secure) -> None:
    assert "speaks TLS: use an mqtts://" in _refusal(f"mqtt://127.0.0.1:{secure.port}", None)


def test_mqtts_to_a_plain_port_says_it_does_not_speak_tls(secure: Secure, mosquitto: RunningBroker) -> None:
    message = _refusal(f"mqtts://127.0.0.1:{mosquitto.port}", _files(secure, "a1"))
    assert "does not speak TLS: use mqtt://" in message


def test_a_wrong_ca_file_is_named(secure: Secure, tmp_path: Path) -> None:
    other = new_authority("another trial's CA")
    write_public(tmp_path / "other-ca.crt", cert_pem(other.cert))
    message = _refusal(f"mqtts://127.0.0.1:{secure.port}", _files(secure, "a1", tmp_path / "other-ca.crt"))
    assert "not trusted by" in message and "wrong CA file" in message


def test_expired_untrusted_and_missing_client_certificates_are_named(secure: Secure, tmp_path: Path) -> None:
    ca = load_authority(secure.root / "ca" / "ca.key", secure.root / "ca.crt")
    key = new_key()
    write_private(tmp_path / "c.key", key_pem(key))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    write_public(tmp_path / "expired.crt", cert_pem(issue(ca, "a1", key, 30, not_before=old)))
    write_public(tmp_path / "foreign.crt", cert_pem(issue(new_authority("x"), "a1", key, 30)))
    url, ca_file = f"mqtts://127.0.0.1:{secure.port}", secure.root / "ca.crt"
    expired = _refusal(url, TlsFiles(ca_file, tmp_path / "expired.crt", tmp_path / "c.key"))
    assert "expired" in expired and "re-provision" in expired
    foreign = _refusal(url, TlsFiles(ca_file, tmp_path / "foreign.crt", tmp_path / "c.key"))
    assert "does not trust our client certificate" in foreign
    assert "requires a client certificate" in _refusal(url, TlsFiles(ca_file, None, None))


def test_snake_agent_run_prints_one_line_without_a_traceback(secure: Secure, tmp_path: Path) -> None:
    other = new_authority("another trial's CA")
    write_public(tmp_path / "other-ca.crt", cert_pem(other.cert))
    agent = secure.creds("a1")
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(agent / "agent.toml"),
           "--broker", f"mqtts://127.0.0.1:{secure.port}", "--tls-ca", str(tmp_path / "other-ca.crt"),
           "--connect-timeout", "5", "--no-calibrate", "--samples", "64", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.BROKER, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "wrong CA file" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
