"""The provisioned broker, checked from outside with mosquitto's own clients: who may connect, read, write."""

from __future__ import annotations

import subprocess
import time

import pytest

from coordinator.pki import cert_pem, issue, key_pem, new_authority, new_key, write_private, write_public
from coordinator.provision import ProvisionSpec, provision
from tests.security.conftest import Secure, run_client, shutil

pytestmark = pytest.mark.broker


def _subscribe(secure: Secure, who: str, topic: str, seconds: float) -> subprocess.Popen[str]:
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        pytest.skip("mosquitto_sub is not installed")
    args = [
        exe,
        *secure.client_args(who),
        "-t",
        topic,
        "-F",
        "%t %p",
        "-W",
        str(int(seconds)),
        "-i",
        f"test-{who}-{time.monotonic_ns()}",
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _publish(secure: Secure, who: str | None, topic: str, text: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_client("mosquitto_pub", [*secure.client_args(who, **kw), "-t", topic, "-m", text])  # type: ignore[arg-type]


def test_anonymous_and_plain_clients_are_refused(secure: Secure) -> None:
    assert _publish(secure, None, "snake/v1/coordinator/inbox", "anon").returncode != 0  # TLS, no certificate
    plain = run_client("mosquitto_pub", ["-h", "127.0.0.1", "-p", str(secure.port), "-t", "x", "-m", "plain"])
    assert plain.returncode != 0


def test_a_certificate_from_another_ca_is_refused(secure: Secure, tmp_path) -> None:
    other = new_authority("someone else's CA")
    key = new_key()
    write_private(tmp_path / "a1.key", key_pem(key))
    write_public(tmp_path / "a1.crt", cert_pem(issue(other, "a1", key, 30)))  # same name, wrong issuer
    args = [*secure.client_args(None), "--cert", str(tmp_path / "a1.crt"), "--key", str(tmp_path / "a1.key")]
    assert run_client("mosquitto_pub", [*args, "-t", "snake/v1/coordinator/inbox", "-m", "x"]).returncode != 0
    assert _publish(secure, "a1", "snake/v1/coordinator/inbox", "genuine").returncode == 0  # the real a1 may


def test_an_agent_reads_only_its_own_inbox_and_writes_no_trial_topics(secure: Secure) -> None:
    spy = _subscribe(secure, "a1", "snake/v1/#", 4)  # a1 asks for everything
    owner = _subscribe(secure, "a2", "snake/v1/#", 4)
    time.sleep(1.0)
    assert _publish(secure, "a3", "snake/v1/agents/a2/inbox", "for-a2").returncode == 0  # P2P: allowed
    _publish(secure, "a3", "snake/v1/trials/t1/state", "trial-wide")  # only the coordinator may: dropped
    _publish(secure, "a3", "snake/v1/agents/a1/status", "not-a3s-status")  # someone else's status: dropped
    _publish(secure, "coordinator", "snake/v1/agents/a1/inbox", "for-a1")
    spied, _ = spy.communicate(timeout=10)
    got, _ = owner.communicate(timeout=10)
    assert got.split() == ["snake/v1/agents/a2/inbox", "for-a2"]
    assert spied.split() == ["snake/v1/agents/a1/inbox", "for-a1"]  # its own inbox, nothing else


def test_rerun_keeps_credentials_and_a_revoked_agent_cannot_connect(secure: Secure) -> None:
    before = (secure.root / "agents" / "a1" / "client.key").read_bytes()
    spec = ProvisionSpec(secure.root, ("a4",), ("localhost", "127.0.0.1"), secure.port, "127.0.0.1")
    done = provision(spec)
    assert done.added == ("a4",) and set(done.kept) >= {"a1", "a2", "a3"}
    assert (secure.root / "agents" / "a1" / "client.key").read_bytes() == before
    assert (secure.root / "agents" / "a1" / "trust" / "a4.pub").exists()
    a4 = secure.creds("a4")
    saved = {f: (a4 / f).read_bytes() for f in ("client.crt", "client.key")}
    secure.broker.restart()  # nothing changed for the broker but the CRL it reads at start
    assert _publish(secure, "a4", "snake/v1/coordinator/inbox", "hi").returncode == 0
    provision(ProvisionSpec(secure.root, (), spec.hosts, spec.port, spec.bind, revoke=("a4",)))
    assert not a4.exists() and not (secure.root / "agents" / "a1" / "trust" / "a4.pub").exists()
    secure.broker.restart()
    a4.mkdir(parents=True)  # the revoked agent kept a copy of its credentials
    for name, data in saved.items():
        write_private(a4 / name, data)
    refused = _publish(secure, "a4", "snake/v1/coordinator/inbox", "hi again")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert _publish(secure, "a1", "snake/v1/coordinator/inbox", "still fine").returncode == 0
