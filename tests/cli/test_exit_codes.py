"""Every documented exit code of both tools, from real processes, with a one-line reason and no traceback.

0 ok, 1 failed, 2 usage, 3 configuration, 4 data, 5 broker, 130 interrupted (Ctrl-C or SIGTERM).
Also in test_cli_errors.py: 0 (``plan``), 3 (a bad value), 4 (``simulate`` without its data set), 5 (an
agent and a closed port), 130 (``simulate`` sent SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import RunningBroker
from edge_agent.exitcodes import ExitCode

NO_BROKER = "mqtt://127.0.0.1:1"  # nothing listens on port 1


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def one_reason(proc: subprocess.CompletedProcess[str], code: ExitCode, errors_before: int = 0) -> str:
    """The one-line reason a failing command ends stderr with (no traceback), after ``errors_before``
    other ERROR lines (e.g. each failed run of ``compare``)."""
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == errors_before + 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[-1]), proc.stderr[-3000:]
    return errors[-1]


def tiny_npz(path: Path, train: int) -> Path:
    np.savez(path, x_train=np.zeros((train, 28, 28), np.uint8), y_train=np.arange(train) % 3,
             x_test=np.zeros((4, 28, 28), np.uint8), y_test=np.arange(4) % 3)  # fmt: skip
    return path


@pytest.mark.parametrize("tool", ["coordinator.cli simulate", "edge_agent.cli run"])
def test_a_bad_flag_is_a_usage_error(tmp_path: Path, tool: str) -> None:
    proc = run(*tool.split(), "--no-such-flag", cwd=tmp_path)
    assert proc.returncode == ExitCode.USAGE and "No such option" in proc.stderr


def test_an_unknown_key_in_the_trial_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text("[train]\nepoch = 2\n")
    reason = one_reason(run("coordinator.cli", "plan", str(tmp_path / "t.toml"), cwd=tmp_path), ExitCode.CONFIG)
    assert "unknown key train.epoch" in reason


def test_an_agent_without_its_data_set_exits_with_the_data_code(tmp_path: Path) -> None:
    proc = run("edge_agent.cli", "run", "--broker", NO_BROKER, "--agent-id", "a1", "--data", "npz:missing.npz",
               "--no-calibrate", cwd=tmp_path)  # fmt: skip
    assert "not found" in one_reason(proc, ExitCode.DATA)


@pytest.mark.parametrize(
    "command",
    [
        ["coordinator.cli", "run", "TRIAL", "--broker", NO_BROKER, "--out", "OUT"],
        ["coordinator.cli", "simulate", "--broker", NO_BROKER, "--out", "OUT"],
        ["coordinator.cli", "compare", "--broker", NO_BROKER, "--out", "OUT"],
        [
            "edge_agent.cli",
            "run",
            "--broker",
            NO_BROKER,
            "--agent-id",
            "a1",
            "--data",
            "npz:NPZ",
            "--no-calibrate",
            "--connect-timeout",
            "1",
        ],
    ],  # fmt: skip
    ids=["run", "simulate", "compare", "agent"],
)
def test_no_broker_is_the_broker_code_within_seconds(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "t.toml").write_text('[trial]\nname = "t"\n')
    npz = tiny_npz(tmp_path / "d.npz", 30)
    given = {"TRIAL": str(tmp_path / "t.toml"), "OUT": str(tmp_path / "o")}
    args = [given.get(a, a).replace("NPZ", str(npz)) for a in command]
    started = time.monotonic()
    proc = run(*args, cwd=tmp_path)
    assert "127.0.0.1:1" in one_reason(proc, ExitCode.BROKER)
    assert time.monotonic() - started < 30  # before any export, agent start or long connect wait
    assert not (tmp_path / "o").exists()  # nothing was started


def test_compare_reports_a_failed_run_and_exits_1(tmp_path: Path) -> None:
    npz = tiny_npz(tmp_path / "d.npz", 15)  # too few samples for two agents: the run fails at its partition
    proc = run("coordinator.cli", "compare", "--dataset", f"npz:{npz}", "--agents", "2", "--algorithms", "snake",
               "--partitions", "iid", "--out", str(tmp_path / "c"), cwd=tmp_path)  # fmt: skip
    assert "1 of 1 runs failed (snake/iid)" in one_reason(proc, ExitCode.FAILED, errors_before=1)
    report = (tmp_path / "c" / "report.md").read_text()
    assert "failed: cannot split 15 samples into 2 parts" in report and "failed: cannot split" in proc.stdout
    assert "Warning" not in proc.stderr  # the plots of a compare whose every run failed are empty, quietly


def test_agent_info_exits_0(tmp_path: Path) -> None:
    proc = run("edge_agent.cli", "info", "--json", cwd=tmp_path)
    assert proc.returncode == ExitCode.OK and '"backends"' in proc.stdout, proc.stderr


@pytest.mark.broker
def test_an_agent_sent_sigterm_exits_130(mosquitto: RunningBroker, tmp_path: Path) -> None:
    npz = tiny_npz(tmp_path / "d.npz", 30)
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--broker", mosquitto.url, "--agent-id", "sigterm-agent",
           "--data", f"npz:{npz}", "--cache-dir", str(tmp_path / "cache"), "--no-calibrate"]  # fmt: skip
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert agent.stderr is not None
        for line in agent.stderr:  # wait until it has joined the broker and idles
            if "connected to" in line:
                break
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
    finally:
        agent.kill()
    assert agent.returncode == ExitCode.INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
