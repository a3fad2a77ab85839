"""``simulate``: a whole trial on one machine: broker, agent processes, coordinator.

Each agent is a real ``snake-agent`` process with its own partition written as an
NPZ file (the documented user format), its own artifact cache and log file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.broker import start_broker
from coordinator.config import TrialConfig
from coordinator.errors import ConfigError, TrialError
from coordinator.trial import run_trial
from edge_agent.data import Dataset, load_dataset, parse_partition, partition, save_npz, split_holdout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimOptions:
    broker: str | None = None  # None: start one (mosquitto if installed, else embedded amqtt)
    broker_kind: str = "auto"
    backends: tuple[str, ...] = ()  # per agent, cycled; empty = "auto"
    threads: int = 0
    show_progress: bool = True


def write_partitions(config: TrialConfig, ds: Dataset, root: Path) -> list[Path]:
    """One NPZ per agent: its share of the training set (capped) and a local validation split."""
    root.mkdir(parents=True, exist_ok=True)
    parts = partition(ds.y_train, config.agents, parse_partition(config.partition), seed=config.seed)
    rng = np.random.default_rng(config.seed)
    paths = []
    for i, idx in enumerate(parts):
        if config.samples_per_agent and len(idx) > config.samples_per_agent:
            idx = np.sort(rng.permutation(idx)[: config.samples_per_agent])
        x, y, xv, yv = split_holdout(ds.x_train[idx], ds.y_train[idx], config.val_fraction, seed=config.seed + i)
        path = root / f"agent-{i}.npz"
        save_npz(path, Dataset(f"{ds.name}[agent-{i}]", x, y, xv, yv, ds.num_classes))
        paths.append(path)
    return paths


class AgentProcesses:
    """The agent processes of a simulation; stopped (terminated, then killed) on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def spawn(self, agent_id: str, broker: str, data: Path, out: Path, backend: str, threads: int) -> None:
        log_path = out / "logs" / f"{agent_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "edge_agent.cli", "run", "--broker", broker, "--agent-id", agent_id,
            "--data", f"npz:{data}", "--cache-dir", str(out / "cache" / agent_id), "--backend", backend,
            "--threads", str(threads),
        ]  # fmt: skip
        with log_path.open("wb") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ.copy()
            )
        self.procs[agent_id] = (proc, log_path)

    def crashed(self) -> str | None:
        """A reason if an agent process has exited with an error."""
        for agent_id, (proc, log_path) in self.procs.items():
            code = proc.poll()
            if code not in (None, 0):
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                return f"{agent_id} exited with code {code}; {log_path}:\n  " + "\n  ".join(tail)
        return None

    def stop(self, grace_s: float = 15.0) -> None:
        """Wait up to ``grace_s`` for agents told to exit, then terminate, then kill after 5 s."""
        deadline = time.monotonic() + grace_s
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def simulate(config: TrialConfig, out: Path, options: SimOptions) -> dict[str, Any]:
    """Run a simulated trial; returns the summary (also in ``out/summary.json``)."""
    backends = options.backends or ("auto",)
    if config.algorithm == "split":  # fail before starting anything (the controller checks hellos too)
        portable = [f"agent-{i}" for i in range(config.agents) if backends[i % len(backends)] == "portable"]
        if portable:
            raise ConfigError(f"split learning needs the ort backend; {', '.join(portable)} would run portable")
    ds = load_dataset(config.dataset)
    paths = write_partitions(config, ds, out / "data")
    broker = None if options.broker else start_broker(options.broker_kind, workdir=out / "broker")
    url = options.broker or (broker.url if broker else "")
    agents = AgentProcesses()
    crash: list[str] = []

    def stop() -> bool:
        reason = agents.crashed()
        if reason:
            crash.append(reason)
        return reason is not None

    try:
        for i, path in enumerate(paths):
            agents.spawn(f"agent-{i}", url, path, out, backends[i % len(backends)], options.threads)
        extra = {"broker": broker.kind if broker else "external", "samples_per_agent": config.samples_per_agent}
        try:
            return run_trial(replace(config), url, out, ds, exit_agents=True, stop=stop,
                             show_progress=options.show_progress, extra=extra)  # fmt: skip
        except TrialError as exc:
            raise TrialError(crash[0] if crash else str(exc)) from exc
    finally:
        agents.stop(grace_s=0.0 if crash else 15.0)
        if broker is not None:
            broker.stop()
