"""``snake-agent install-service``: the unit and agent.toml it writes, checked by systemd's own verifier."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent_file import read_agent_file
from edge_agent.exitcodes import ExitCode
from edge_agent.service_unit import UnitSpec, default_memory_max_mb, render_unit, systemd_version

REPO = Path(__file__).resolve().parents[2]
AGENT = ["--broker", "mqtt://10.0.0.2:1883", "--agent-id", "pi-1", "--data", "fashion-mnist", "--partition", "iid",
         "--part", "1/4", "--username", "board", "--memory-budget-mb", "900"]  # fmt: skip


def _install(tmp_path: Path, *extra: str, password: str | None = "pw-123") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home")}
    env.pop("SNAKE_MQTT_PASSWORD", None)
    if password:
        env["SNAKE_MQTT_PASSWORD"] = password
    args = ["--config-dir", str(tmp_path / "etc"), "--unit-dir", str(tmp_path / "units"), *extra]
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "install-service", *AGENT, *args],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_a_system_unit_and_its_config(tmp_path: Path) -> None:
    out = _install(tmp_path)
    assert out.returncode == 0, out.stderr
    unit = (tmp_path / "units" / "snake-agent.service").read_text()
    for line in ("User=snake", "WorkingDirectory=/var/lib/snakelearn", "Restart=on-failure", "RestartSec=5s",
                 "StartLimitIntervalSec=0", "RestartPreventExitStatus=2 3 4", "MemoryMax=900M",
                 f"EnvironmentFile=-{tmp_path / 'etc' / 'agent.env'}", "StandardError=journal",
                 f"run --config {tmp_path / 'etc' / 'agent.toml'}", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in unit, line
    env = tmp_path / "etc" / "agent.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and env.read_text() == "SNAKE_MQTT_PASSWORD=pw-123\n"
    config = tmp_path / "etc" / "agent.toml"
    assert "pw-123" not in config.read_text() + out.stdout + out.stderr
    keys = ["broker", "agent_id", "data", "partition", "part", "username", "memory_budget_mb", "cache_dir"]
    settings = read_agent_file(config, keys)  # what run --config reads back
    assert settings["part"] == "1/4" and settings["memory_budget_mb"] == 900
    assert settings["cache_dir"] == "/var/lib/snakelearn/cache"
    assert "sudo systemctl enable --now snake-agent" in out.stdout and "useradd --system" in out.stdout
    verified = _verify(tmp_path / "units" / "snake-agent.service")
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr  # no warning either


def test_it_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert _install(tmp_path).returncode == 0
    again = _install(tmp_path)
    assert again.returncode == ExitCode.CONFIG and "already exist" in again.stderr and "--force" in again.stderr
    assert _install(tmp_path, "--force", "--memory-budget-mb", "700").returncode == 0
    assert "MemoryMax=700M" in (tmp_path / "units" / "snake-agent.service").read_text()


def test_a_user_unit(tmp_path: Path) -> None:
    out = _install(tmp_path, "--user", "--name", "snake-pi", password=None)
    assert out.returncode == 0, out.stderr
    unit = tmp_path / "units" / "snake-pi.service"
    text = unit.read_text()
    assert "User=" not in text and "WantedBy=default.target" in text
    assert not (tmp_path / "etc" / "agent.env").exists()  # no secret given, no env file
    assert "systemctl --user enable --now snake-pi" in out.stdout and "enable-linger" in out.stdout
    verified = _verify(unit)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr


def test_the_verifier_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit whose agent command does not exist does not verify cleanly."""
    spec = UnitSpec([str(tmp_path / "no-such-agent")], tmp_path / "a.toml", tmp_path / "a.env", tmp_path, 0, "x", None)
    unit = tmp_path / "broken.service"
    unit.write_text(render_unit(spec))
    verified = _verify(unit)
    assert verified.returncode != 0 or "no-such-agent" in verified.stderr


def test_backoff_steps_only_where_systemd_knows_them() -> None:
    spec = UnitSpec(["/usr/bin/snake-agent"], Path("/e/a.toml"), Path("/e/a.env"), Path("/w"), 512, "x", "snake", 252)
    assert "RestartSteps" not in render_unit(spec)
    newer = render_unit(dataclasses.replace(spec, systemd_version=256))
    assert "RestartSteps=6" in newer and "RestartMaxDelaySec=300s" in newer
    assert systemd_version("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT") == 252 and systemd_version("") == 0
    assert default_memory_max_mb(3796, 0) == 2847 and default_memory_max_mb(8000, 0) == 6976
    assert default_memory_max_mb(8000, 900) == 900
