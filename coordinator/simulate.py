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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coordinator.broker import free_port, start_broker
from coordinator.config import TrialConfig
from coordinator.errors import ConfigError, TrialError
from coordinator.memcap import MemoryCap
from coordinator.partitions import write_partitions, write_token_partitions
from coordinator.secure_broker import start_provisioned
from coordinator.trial import Workload, run_trial
from edge_agent.data import Dataset, load_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimOptions:
    broker: str | None = None  # None: start one (mosquitto if installed, else embedded amqtt)
    broker_kind: str = "auto"
    backends: tuple[str, ...] = ()  # per agent, cycled; empty = "auto"
    threads: int = 0
    show_progress: bool = True
    calibrate: bool = (
        True  # agents measure their speed for the planner; False: equal speeds, a plan fixed by the config
    )
    secure: bool = False  # provision into the run dir: TLS broker, per-agent certificates, signed messages


class AgentProcesses:
    """The agent processes of a simulation; stopped (terminated, then killed) on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.caps: dict[str, MemoryCap] = {}
        self.reported: set[str] = set()

    def spawn(
        self,
        agent_id: str,
        broker: str,
        data: Path,
        out: Path,
        backend: str,
        threads: int,
        memory_mb: int = 0,
        calibrate: bool = True,
        prefix: Sequence[str] = (),
        config_file: Path | None = None,
    ) -> None:
        """Start one agent; ``memory_mb`` > 0 runs it in a cgroup capped at that (an OOM kill beyond it);
        ``prefix`` goes before the command (e.g. ``ip netns exec NS`` to run it on a test bed's host)."""
        log_path = out / "logs" / f"{agent_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "edge_agent.cli", "run", "--broker", broker, "--agent-id", agent_id,
            "--data", f"npz:{data}", "--cache-dir", str(out / "cache" / agent_id), "--backend", backend,
            "--threads", str(threads), "--calibrate" if calibrate else "--no-calibrate",
        ]  # fmt: skip
        if config_file is not None:  # a provisioned agent.toml: TLS and signing files (flags above override it)
            cmd += ["--config", str(config_file)]
        if memory_mb:
            self.caps[agent_id] = cap = MemoryCap(agent_id, memory_mb)
            cmd = cap.wrap(cmd)
            log.info("%s runs under a %d MiB memory cap (%s)", agent_id, memory_mb, cap.path)
        cmd = [*prefix, *cmd]
        with log_path.open("wb") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ.copy()
            )
        self.procs[agent_id] = (proc, log_path)

    def crashed(self) -> str | None:
        """A reason if an agent process has exited with an error (each exit is reported once)."""
        for agent_id, (proc, log_path) in self.procs.items():
            code = proc.poll()
            if code not in (None, 0) and agent_id not in self.reported:
                self.reported.add(agent_id)
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                cap = self.caps.get(agent_id)
                why = (
                    f" (killed for going over its {cap.limit_mb} MiB memory cap)"
                    if cap is not None and cap.oom_killed()
                    else ""
                )
                return f"{agent_id} exited with code {code}{why}; {log_path}:\n  " + "\n  ".join(tail)
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
        for cap in self.caps.values():
            cap.remove()


def workload_and_partitions(config: TrialConfig, root: Path) -> tuple[Dataset | Workload, list[Path]]:
    """The trial's data (image data set, or a language model's workload with its base model) and one
    partition file per agent under ``root``."""
    if config.is_text:
        from coordinator.lm_trial import text_workload

        workload, tokens = text_workload(config)
        return workload, write_token_partitions(config, tokens, root)
    ds = load_dataset(config.dataset)
    return ds, write_partitions(config, ds, root)


def simulate(config: TrialConfig, out: Path, options: SimOptions) -> dict[str, Any]:
    """Run a simulated trial; returns the summary (also in ``out/summary.json``)."""
    backends = options.backends or ("auto",)
    if config.algorithm == "split":  # fail before starting anything (the controller checks hellos too)
        chosen = [config.member(i).backend or backends[i % len(backends)] for i in range(config.agents)]
        portable = [f"agent-{i}" for i, backend in enumerate(chosen) if backend == "portable"]
        if portable:
            raise ConfigError(f"split learning needs the ort backend; {', '.join(portable)} would run portable")
    workload, paths = workload_and_partitions(config, out / "data")
    secure = provision_run(out, config.agents) if options.secure else None
    if secure is not None:
        broker = start_provisioned(secure, out / "broker" / "mosquitto.log")
    else:
        broker = None if options.broker else start_broker(options.broker_kind, workdir=out / "broker")
    url = options.broker or (broker.url if broker else "")
    agents = AgentProcesses()
    crash: list[str] = []
    exits: list[str] = []  # snake routes around a lost agent: its exit is reported, the trial goes on
    tolerant = config.algorithm == "snake"

    def stop() -> bool:
        reason = agents.crashed()
        if reason and tolerant:
            log.warning("%s", reason)
            exits.append(reason.splitlines()[0])
            return False
        if reason:
            crash.append(reason)
        return reason is not None

    try:
        for i, path in enumerate(paths):
            member = config.member(i)
            backend = member.backend or backends[i % len(backends)]
            threads = member.threads or options.threads
            toml = secure / "agents" / f"agent-{i}" / "agent.toml" if secure else None
            agents.spawn(f"agent-{i}", url, path, out, backend, threads, member.memory_mb, options.calibrate,
                         config_file=toml)  # fmt: skip
        extra = {"broker": broker.kind if broker else "external", "samples_per_agent": config.samples_per_agent,
                 "agent_exits": exits, "secure": secure is not None}  # fmt: skip
        try:
            return run_trial(replace(config), url, out, workload, exit_agents=True, stop=stop,
                             show_progress=options.show_progress, extra=extra,
                             provisioned=secure / "coordinator" if secure else None)  # fmt: skip
        except TrialError as exc:
            raise TrialError(crash[0] if crash else str(exc)) from exc
    finally:
        agents.stop(grace_s=0.0 if crash else 15.0)
        if broker is not None:
            broker.stop()


def provision_run(out: Path, agents: int) -> Path:
    """``simulate --secure``: credentials for agent-0..N-1 and a TLS broker on a free loopback port."""
    from coordinator.provision import ProvisionSpec, provision

    root = out / "secure"
    ids = tuple(f"agent-{i}" for i in range(agents))
    provision(ProvisionSpec(root, ids, ("127.0.0.1", "localhost"), free_port(), "127.0.0.1", data="npz:unused"))
    return root
