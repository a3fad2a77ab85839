"""``snake-agent check`` on a real mosquitto (password file, plain and TLS listeners): a ready machine passes
every check; no broker, a wrong password, a wrong CA, an expired certificate, a TLS/plain port mix-up,
missing data and a missing backend each fail with the reason and a fix, and the command exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import find_mosquitto, free_port
from edge_agent.broker_check import check_broker
from edge_agent.checks import Check, check_clock, check_data, model_needs_mb
from edge_agent.config import AgentConfig
from edge_agent.protocol.manifest import SegmentManifest

pytestmark = [pytest.mark.broker]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    from tests.cli.brokers import start_secure_broker

    broker = start_secure_broker(tmp_path_factory.mktemp("secure-broker"))
    yield broker
    broker.stop()


def _password_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "password"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (40, 28, 28), np.uint8), y_train=np.arange(40) % 7,
             x_test=np.zeros((4, 28, 28), np.uint8), y_test=np.arange(4))  # fmt: skip
    return tmp_path / "d.npz"


def _config(tmp_path: Path, broker: str, password: str = "s3cret-pw", tls_ca: Path | None = None) -> AgentConfig:
    from tests.cli.brokers import USER

    return AgentConfig("board-1", broker, f"npz:{_npz(tmp_path)}", cache_dir=tmp_path / "cache", username=USER,
                       password_file=_password_file(tmp_path, password), tls_ca=tls_ca)  # fmt: skip


def _failed(checks: list[Check]) -> Check:
    bad = [c for c in checks if not c.ok]
    assert len(bad) == 1, checks
    assert "s3cret" not in bad[0].detail + bad[0].fix  # the password never shows
    return bad[0]


def test_a_ready_board_passes_every_check(secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path, f"mqtt://127.0.0.1:{secure.plain_port}")
    lines = [f"{k} = {json.dumps(str(v))}" for k, v in [("broker", config.broker), ("agent_id", config.agent_id),
             ("data", config.data), ("cache_dir", config.cache_dir), ("username", config.username),
             ("password_file", config.password_file)]]  # fmt: skip
    (tmp_path / "agent.toml").write_text("\n".join(lines) + "\n")
    out = _check("--config", str(tmp_path / "agent.toml"), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and [c["name"] for c in report["checks"]] == [
        "backend", "data", "memory", "disk", "clock", "broker", "torch"]  # fmt: skip
    by_name = {c["name"]: c["detail"] for c in report["checks"]}
    assert "40 training and 4 validation samples of shape (1, 28, 28), 7 of 7 labels present" in by_name["data"]
    assert "onnxruntime" in by_name["backend"] and "GFLOP/s" in by_name["backend"]
    assert "connected with user 'board'" in by_name["broker"] and "not imported" in by_name["torch"]
    plain = _check("--config", str(tmp_path / "agent.toml"))
    assert plain.returncode == 0 and plain.stdout.count("PASS") == 7 and "s3cret" not in plain.stdout


def test_no_broker_fails_with_a_fix_and_a_non_zero_exit(tmp_path: Path) -> None:
    closed = free_port()
    out = _check("--broker", f"mqtt://127.0.0.1:{closed}", "--agent-id", "b1", "--data", f"npz:{_npz(tmp_path)}",
                 "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert out.returncode == 1
    assert f"FAIL  broker   mqtt://127.0.0.1:{closed}: nothing answers" in out.stdout
    assert "fix:     start the broker" in out.stdout and out.stdout.count("FAIL") == 1


def test_wrong_password_is_refused_by_the_broker(secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = _failed(check_broker(_config(tmp_path, f"mqtt://127.0.0.1:{secure.plain_port}", password="wrong")))
    assert "refused the connection: Bad user name or password" in bad.detail or "Not authorized" in bad.detail
    assert "--username and the password file" in bad.fix


def test_wrong_ca_and_port_mix_ups(secure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls = f"mqtts://127.0.0.1:{secure.tls_port}"
    bad = _failed(check_broker(_config(tmp_path, tls)))  # the broker's CA is not among the system's
    assert "fails verification against the system's CAs" in bad.detail and "--tls-ca" in bad.fix
    wrong = _failed(check_broker(_config(tmp_path, tls, tls_ca=secure.other_ca)))  # a CA that did not sign it
    assert f"fails verification against CA {secure.other_ca}" in wrong.detail and "did not sign" in wrong.fix
    checks = check_broker(_config(tmp_path, tls, tls_ca=secure.ca))  # the right CA: TLS, then MQTT with the password
    assert [c.name for c in checks] == ["tls", "broker"] and all(c.ok for c in checks), checks
    mixed = _failed(check_broker(_config(tmp_path, f"mqtts://127.0.0.1:{secure.plain_port}")))
    assert "no TLS handshake" in mixed.detail and "use mqtt:// for a plain port" in mixed.fix
    reverse = _failed(check_broker(_config(tmp_path, f"mqtt://127.0.0.1:{secure.tls_port}")))
    assert "speaks TLS" in reverse.detail and "use mqtts://host:port" in reverse.fix


def test_an_expired_broker_certificate_is_named(tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    from tests.cli.brokers import start_secure_broker

    broker = start_secure_broker(tmp_path, expired=True)
    try:
        bad = _failed(check_broker(_config(tmp_path, f"mqtts://127.0.0.1:{broker.tls_port}", tls_ca=broker.ca)))
    finally:
        broker.stop()
    assert "certificate has expired" in bad.detail and "issue a new one" in bad.fix


def test_missing_data_and_a_clock_in_the_past(tmp_path: Path) -> None:
    missing, data = check_data(AgentConfig("d1", "mqtt://x:1", f"fashion-mnist:{tmp_path / 'nowhere'}"))
    assert not missing.ok and data is None and "dataset-fashion-mnist" in missing.fix
    past = check_clock(lambda: 86400.0)
    assert not past.ok and "1970-01-02" in past.detail and "timedatectl set-ntp true" in past.fix


def test_the_cheapest_segment_of_a_cached_model() -> None:
    shapes = {"a.weight": (10, 4), "b.weight": (1000, 256)}
    common = dict(input_name="x", label_name="y", logits_name="l", loss_name="s", order=tuple(shapes),
                  shapes=shapes, buffers=(), segment_buffers=(), optimizer="adamw", num_classes=10,
                  input_shape=(4,))  # fmt: skip
    head, big = SegmentManifest(trainable=("a.weight",), **common), SegmentManifest(trainable=("b.weight",), **common)
    model_mb = 4 * (40 + 256_000) / (1 << 20)
    assert model_needs_mb([big, head]) == {"2 tensors, 1.0 MiB": pytest.approx(model_mb + 3 * 160 / (1 << 20))}


def test_no_backend_installed(tmp_path: Path) -> None:
    """A real environment without onnxruntime: everything of this venv's site-packages but onnxruntime."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    target = next((venv / "lib").glob("python3*/site-packages"))
    for entry in site.iterdir():
        if not entry.name.lower().startswith("onnxruntime") and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    out = _check("--broker", "mqtt://127.0.0.1:1", "--agent-id", "n1", "--data", f"npz:{_npz(tmp_path)}",
                 "--cache-dir", str(tmp_path / "cache"), python=str(venv / "bin" / "python"))  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "FAIL  backend  no onnxruntime installed" in out.stdout and "snakelearn[agent-portable]" in out.stdout


def _check(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([python, "-m", "edge_agent.cli", "check", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)  # fmt: skip
