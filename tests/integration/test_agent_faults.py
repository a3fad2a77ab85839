"""Agents killed with SIGKILL in the middle of a real trial (mosquitto, agent processes, ONNX Runtime):
the trial completes around them, with the lost hop trained again elsewhere, and reports what happened."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from coordinator.config import Timeouts, TrialConfig, load_trial
from coordinator.simulate import SimOptions, simulate
from edge_agent.protocol.envelope import Envelope
from tools.faultkit import AgentProcess, Watch

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(240)]


def trial() -> TrialConfig:
    config = load_trial(None, {"model": "mlp", "agents": 3, "rounds": 2, "samples_per_agent": 1200,
                               "train.batch_size": 32, "train.epochs": 2})  # fmt: skip
    return replace(config, timeouts=Timeouts(offline_s=3.0, holder_s=20.0))


class KillOnHop:
    """SIGKILLs the agent that reports ``hop_started`` for ``hop`` (once); optionally starts it again."""

    def __init__(self, out: Path, port: int, hop: int, restart_after_s: float | None = None) -> None:
        self.out, self.hop, self.restart_after_s = out, hop, restart_after_s
        self.victim: str | None = None
        self.restarted: list[object] = []
        self.lock = threading.Lock()
        self.watch = Watch(port, self.on_envelope)

    def on_envelope(self, topic: str, env: Envelope) -> None:
        if env.type != "hop_started" or env.body.get("hop") != self.hop:
            return
        with self.lock:
            if self.victim is not None:
                return
            self.victim = env.src
        argv = AgentProcess(self.out, env.src).kill()
        if argv is not None and self.restart_after_s is not None:
            timer = threading.Timer(self.restart_after_s, lambda: self.restarted.append(
                AgentProcess(self.out, env.src).start(argv)))  # fmt: skip
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        self.watch.close()
        for proc in self.restarted:
            proc.kill()  # type: ignore[attr-defined]


def run(tmp_path: Path, broker: RunningBroker, hop: int, restart_after_s: float | None = None) -> tuple[dict, str]:  # type: ignore[type-arg]
    out = tmp_path / "run"
    kill = KillOnHop(out, broker.port, hop, restart_after_s)
    try:
        summary = simulate(trial(), out, SimOptions(broker=broker.url, show_progress=False, calibrate=False))
    finally:
        kill.close()
    assert kill.victim is not None
    return summary, kill.victim


def test_an_agent_killed_mid_hop_is_routed_around_and_its_hop_trained_elsewhere(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    summary, victim = run(tmp_path, mosquitto, hop=1)
    assert summary["final_test_accuracy"] > 0.5
    assert victim in summary["lost_agents"] and summary["hops_retried"] >= 1 and summary["hops_lost"] == 0
    assert [f["kind"] for f in summary["faults"]] == ["agent_lost"] and summary["faults"][0]["hop"] == 1
    assert any(victim in line for line in summary["agent_exits"])  # reported, not fatal
    hops = [h for h in summary["plan"]["hops"]]  # the plan as first made; the route after it differs
    assert len(hops) == 6
    # every hop of the trial was trained by an agent that lived to hand it on; the victim trained none after
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(f'"agent": "{victim}"' not in line for line in lines[1:])


def test_an_agent_killed_mid_hop_and_restarted_trains_its_hop_again(mosquitto: RunningBroker, tmp_path: Path) -> None:
    summary, victim = run(tmp_path, mosquitto, hop=1, restart_after_s=0.5)
    assert summary["final_test_accuracy"] > 0.5
    assert summary["hops_lost"] == 0 and summary["hops_retried"] >= 1
    kinds = [f["kind"] for f in summary["faults"]]
    assert kinds in (["agent_restarted"], ["agent_lost", "agent_returned"]), kinds
