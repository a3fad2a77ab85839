"""The command-line tools fail with a clear message and the documented exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.exitcodes import ExitCode


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_simulate_with_a_missing_data_set_says_how_to_install_it(tmp_path: Path) -> None:
    proc = run(
        "coordinator.cli",
        "simulate",
        "--dataset",
        f"fashion-mnist:{tmp_path}/none",
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert proc.returncode == ExitCode.DATA
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_simulate_with_a_bad_trial_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text("[train]\nepochs = 0\n")
    proc = run("coordinator.cli", "simulate", "--config", str(tmp_path / "t.toml"), cwd=tmp_path)
    assert proc.returncode == ExitCode.CONFIG and "train.epochs" in proc.stderr


def test_agent_with_an_unreachable_broker_exits_with_the_broker_code(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    npz = tmp_path / "d.npz"
    import numpy as np

    np.savez(
        npz,
        x_train=np.zeros((4, 28, 28), np.uint8),
        y_train=np.arange(4),
        x_test=np.zeros((2, 28, 28), np.uint8),
        y_test=np.arange(2),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{port}", "--agent-id", "a1", "--data", f"npz:{npz}", "--cache-dir", str(tmp_path / "c"), "--connect-timeout", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == ExitCode.BROKER, proc.stderr
    assert "127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("agent_id", ["bad/id", "coordinator", "+"])
def test_agent_refuses_ids_that_break_topics(tmp_path: Path, agent_id: str) -> None:
    proc = run(
        "edge_agent.cli",
        "run",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--agent-id",
        agent_id,
        "--data",
        "x.npz",
        cwd=tmp_path,
    )
    assert proc.returncode == ExitCode.USAGE and "invalid agent id" in proc.stderr


def test_split_learning_refuses_portable_agents_by_name_before_starting(tmp_path: Path) -> None:
    proc = run("coordinator.cli", "simulate", "--algorithm", "split", "--agents", "2", "--agent-backends", "ort,portable",
               "--out", str(tmp_path / "o"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == ExitCode.CONFIG
    assert "split learning needs the ort backend; agent-1 would run portable" in proc.stderr
    assert not (tmp_path / "o" / "logs").exists()  # no agent was started


def test_plan_prints_a_split_plan_and_refuses_a_cut_that_leaves_no_back(tmp_path: Path) -> None:
    proc = run("coordinator.cli", "plan", "--algorithm", "split", "--agents", "2", "--rounds", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-3:] == [
        "segment 0: conv0 (352 params): the front, trained on the agents in turn",
        "segment 1: conv1, fc, head (421,386 params): the back, trained on the coordinator for every agent's batches",
        "round 0: agent-0[s0] -> agent-1[s0]",
    ]
    bad = run("coordinator.cli", "plan", "--algorithm", "split", "--split-cut", "head", cwd=tmp_path)
    assert bad.returncode == ExitCode.CONFIG and "choose one of: conv0, conv1, fc" in bad.stderr


def _processes_naming(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and proc.name.isdigit():
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.mark.slow
def test_sigterm_stops_simulate_with_its_broker_and_agents(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "coordinator.cli", "simulate", "--model", "mlp", "--agents", "2", "--rounds", "50"]
    cmd += ["--samples-per-agent", "300", "--broker-kind", "mosquitto", "--out", str(out)]
    brokers_before = set(_processes_naming("snake-mosquitto-"))
    coordinator = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and coordinator.poll() is None:
        time.sleep(0.2)  # the trial is under way: broker and agents run
    assert _processes_naming(str(out)), "no agent process was started"
    assert set(_processes_naming("snake-mosquitto-")) - brokers_before, "no broker was started"
    coordinator.send_signal(signal.SIGTERM)
    _, err = coordinator.communicate(timeout=60)
    assert coordinator.returncode == ExitCode.INTERRUPTED, err[-2000:]
    deadline = time.monotonic() + 20
    while _processes_naming(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_naming(str(out)), "agents outlived the coordinator"
    assert not set(_processes_naming("snake-mosquitto-")) - brokers_before, "the broker outlived the coordinator"
