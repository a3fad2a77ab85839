"""A whole trial on loopback as real processes, for fault tests and ``tools/chaos.py``.

``LoopbackTrial`` starts its own mosquitto (persistent sessions, so it can be restarted mid-trial), one
``snake-agent`` process per agent (``coordinator.simulate.AgentProcesses``, partitions written the way
``simulate`` writes them) and the coordinator as ``python -m coordinator.cli run TRIAL --broker URL
--stop-agents --out RUN_DIR``. It can SIGKILL the coordinator and start it again with ``--resume RUN_DIR``,
SIGKILL an agent and start it again (``tools.faultkit.AgentProcess``), and restart the broker. Every
process it starts is stopped by ``stop()``, on leaving its ``with`` block, or at interpreter exit.

Everything lives in the run directory: ``logs/`` (one log per agent, ``coordinator.log`` across the
coordinator's lives, the broker's log under ``broker/``), ``data/``, ``cache/``, and the coordinator's results.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from coordinator.broker import RunningBroker, start_broker
from coordinator.config import TrialConfig, load_trial
from coordinator.partitions import write_partitions
from coordinator.simulate import AgentProcesses
from edge_agent.data import load_dataset
from tools.faultkit import AgentProcess

log = logging.getLogger(__name__)

TRAINED = re.compile(r"hop (\d+) \(round \d+\): training segment")
_LIVE: set[LoopbackTrial] = set()


def write_trial_file(path: Path, settings: Mapping[str, Any]) -> Path:
    """A trial TOML from ``settings`` ("key" for [trial], "section.key" otherwise; str, int, float, bool)."""
    sections: dict[str, list[str]] = {}
    for key, value in settings.items():
        section, _, leaf = key.rpartition(".")
        sections.setdefault(section or "trial", []).append(f"{leaf} = {json.dumps(value)}")
    text = "".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in sections.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def model_digest(out: Path) -> str | None:
    """sha256 over the final inference model's weights (other bytes of the ONNX file may differ per export)."""
    path = out / "final_model.onnx"
    if not path.is_file():
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return hashlib.sha256(b"".join(t.raw_data for t in model.graph.initializer)).hexdigest()


def trained_hops(out: Path) -> dict[str, Counter[int]]:
    """Per agent log: how many times each hop was started in training ("hop N (round R): training segment")."""
    return {p.stem: Counter(int(m.group(1)) for m in TRAINED.finditer(p.read_text(errors="replace")))
            for p in sorted((out / "logs").glob("agent-*.log"))}  # fmt: skip


def metrics_hops(out: Path) -> list[int]:
    """The hops of ``metrics.jsonl``, in order (one line per finished hop)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["hop"] for line in lines if line.strip()]


class LoopbackTrial:
    """One trial's processes on 127.0.0.1: broker, agents, coordinator (see the module docstring)."""

    def __init__(self, trial: Path, out: Path, autosave_s: int = 1) -> None:
        self.trial, self.out = Path(trial).resolve(), Path(out).resolve()
        self.config: TrialConfig = load_trial(self.trial)
        self.autosave_s = autosave_s
        self.broker: RunningBroker | None = None
        self.agents = AgentProcesses()
        self.restarted: list[subprocess.Popen[bytes]] = []  # agents started again after a kill
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.lives = 0  # coordinator processes started
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        _LIVE.add(self)

    @property
    def url(self) -> str:
        assert self.broker is not None, "start_broker() first"
        return self.broker.url

    @property
    def agent_ids(self) -> list[str]:
        return [f"agent-{i}" for i in range(self.config.agents)]

    # -- starting ---------------------------------------------------------------------------------
    def start_broker(self) -> RunningBroker:
        self.broker = start_broker("mosquitto", workdir=self.out / "logs" / "broker", autosave_s=self.autosave_s)
        return self.broker

    def start_agents(self, calibrate: bool = False, backend: str = "auto") -> None:
        """One process per agent; ``calibrate=False``: equal speeds, so the plan is fixed by the trial file."""
        paths = write_partitions(self.config, load_dataset(self.config.dataset), self.out / "data")
        for i, path in enumerate(paths):
            member = self.config.member(i)
            self.agents.spawn(f"agent-{i}", self.url, path, self.out, member.backend or backend, member.threads,
                              member.memory_mb, calibrate)  # fmt: skip

    def start_coordinator(self, resume: bool = False) -> subprocess.Popen[bytes]:
        """``coordinator.cli run`` (``--resume RUN_DIR`` after a kill), its log appended to logs/coordinator.log."""
        where = ["--resume", str(self.out)] if resume else ["--out", str(self.out)]
        cmd = [sys.executable, "-m", "coordinator.cli", "run", str(self.trial), "--broker", self.url,
               "--stop-agents", *where]  # fmt: skip
        self.lives += 1
        with (self.out / "logs" / "coordinator.log").open("ab") as fh:
            fh.write(f"\n----- coordinator life {self.lives}{' (--resume)' if resume else ''} -----\n".encode())
            fh.flush()
            self.coordinator = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=os.environ.copy(), start_new_session=True)  # fmt: skip
        return self.coordinator

    # -- faults -----------------------------------------------------------------------------------
    def kill_coordinator(self) -> bool:
        """SIGKILL the coordinator's process group; False if it was not running."""
        proc = self.coordinator
        if proc is None or proc.poll() is not None:
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True

    def resume_coordinator(self) -> subprocess.Popen[bytes]:
        return self.start_coordinator(resume=True)

    def kill_agent(self, agent_id: str) -> list[str] | None:
        """SIGKILL one agent; its command line (for ``restart_agent``), None if it was not running."""
        return AgentProcess(self.out, agent_id).kill()

    def restart_agent(self, agent_id: str, argv: list[str]) -> None:
        self.restarted.append(AgentProcess(self.out, agent_id).start(argv))

    def restart_broker(self, kill: bool, down_s: float = 0.0) -> None:
        assert self.broker is not None
        self.broker.restart(kill=kill, down_s=down_s)

    # -- waiting and results ----------------------------------------------------------------------
    def wait_coordinator(self, timeout_s: float) -> int | None:
        """The coordinator's exit code, or None if it is still running after ``timeout_s``."""
        assert self.coordinator is not None
        try:
            return self.coordinator.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def summary(self) -> dict[str, Any]:
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def coordinator_log_tail(self, lines: int = 12) -> str:
        return "\n".join((self.out / "logs" / "coordinator.log").read_text(errors="replace").splitlines()[-lines:])

    # -- stopping ---------------------------------------------------------------------------------
    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process this trial started (idempotent): coordinator, agents (``grace_s`` to exit on
        their own after a finished trial), restarted agents, broker."""
        _LIVE.discard(self)
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            try:
                self.coordinator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.coordinator.pid, signal.SIGKILL)
                self.coordinator.wait()
        deadline = time.monotonic() + grace_s
        for proc in self.restarted:
            _end(proc, max(0.0, deadline - time.monotonic()))
        self.restarted.clear()
        self.agents.stop(grace_s=max(0.0, deadline - time.monotonic()))
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> LoopbackTrial:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(grace_s=10.0 if exc_type is None else 0.0)


def _end(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@atexit.register
def _stop_all() -> None:
    for trial in list(_LIVE):
        trial.stop(grace_s=0.0)
