"""``snake-agent run --config agent.toml``: one file holds an agent's settings, flags and environment override it,
unknown keys and inline secrets are refused by name, the password file is read but never printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent_file import AgentFileError, read_agent_file, read_secret
from edge_agent.config import AgentConfig
from edge_agent.exitcodes import ExitCode
from edge_agent.service import broker_url, describe


def _closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_dir(tmp_path: Path, **extra: str) -> Path:
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.arange(4),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.arange(2))  # fmt: skip
    lines = [
        f'broker = "mqtt://127.0.0.1:{_closed_port()}"',
        'agent_id = "from-file"',
        f'data = "npz:{tmp_path / "d.npz"}"',
        'cache_dir = "cache"',
        "connect_timeout = 2",
        "calibrate = false",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    (tmp_path / "agent.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "agent.toml"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})  # fmt: skip


def test_the_file_alone_runs_an_agent_and_flags_override_it(tmp_path: Path) -> None:
    config = _agent_dir(tmp_path)
    alone = _run("--config", str(config))
    assert alone.returncode == ExitCode.BROKER, alone.stderr
    assert "'snake-agent-from-file'" in alone.stderr and "Traceback" not in alone.stderr
    flagged = _run("--config", str(config), "--agent-id", "from-flag")
    assert flagged.returncode == ExitCode.BROKER and "'snake-agent-from-flag'" in flagged.stderr
    from_env = _run("--config", str(config), env={"SNAKE_AGENT_ID": "from-env"})
    assert "'snake-agent-from-env'" in from_env.stderr


def test_unknown_keys_and_inline_secrets_are_refused_by_name(tmp_path: Path) -> None:
    config = _agent_dir(tmp_path, brokr='"typo"')
    proc = _run("--config", str(config))
    assert (
        proc.returncode == ExitCode.CONFIG and "unknown key 'brokr'" in proc.stderr and "Traceback" not in proc.stderr
    )
    config = _agent_dir(tmp_path, password='"hunter2"')
    proc = _run("--config", str(config))
    assert proc.returncode == ExitCode.CONFIG and "password_file" in proc.stderr and "hunter2" not in proc.stderr
    proc = _run("--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == ExitCode.CONFIG and "no such file" in proc.stderr


def test_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    config = _agent_dir(tmp_path, password_file='"secret/pw"')
    settings = read_agent_file(config, {"broker", "agent_id", "data", "cache_dir", "connect_timeout", "calibrate",
                                        "password_file"})  # fmt: skip
    assert settings["cache_dir"] == str(tmp_path / "cache")
    assert settings["password_file"] == str(tmp_path / "secret" / "pw")
    with pytest.raises(AgentFileError, match="must be a path string"):
        (tmp_path / "bad.toml").write_text("cache_dir = 3\n")
        read_agent_file(tmp_path / "bad.toml", {"cache_dir"})


def test_the_password_file_fills_the_url_and_is_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-value\n")
    secret.chmod(0o600)
    config = AgentConfig(agent_id="a1", broker="mqtts://edge@127.0.0.1:8883", data="x", password_file=secret)
    url = broker_url(config)
    assert (url.username, url.password, url.tls) == ("edge", "s3cret-value", True)
    assert "s3cret" not in describe(config) and "s3cret" not in str(url) and "s3cret" not in repr(url)
    secret.chmod(0o644)
    with pytest.raises(AgentFileError, match="chmod 600"):
        read_secret(secret)
    secret.chmod(0o600)
    secret.write_text("\n")
    with pytest.raises(AgentFileError, match="empty"):
        read_secret(secret)


def test_a_password_without_a_user_name_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    config = AgentConfig(agent_id="a1", broker="mqtt://127.0.0.1:1883", data="x", password_file=secret)
    with pytest.raises(Exception, match="no user name"):
        broker_url(config)
    named = AgentConfig(agent_id="a1", broker="mqtt://127.0.0.1:1883", data="x", username="edge", password_file=secret)
    assert broker_url(named).username == "edge"
