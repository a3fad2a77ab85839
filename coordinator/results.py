"""A trial's run directory: ``metrics.jsonl`` (one line per hop), ``summary.json``, PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordinator.events import Event, Excluded, Fault, HopFinished, Joined, RoundEvaluated, SaidBye
from edge_agent.protocol.messages import Bye, Hello, HopDone

log = logging.getLogger(__name__)


@dataclass
class AgentFigures:
    agent_id: str
    backend: str = "?"
    peak_rss_mb: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    hops: int = 0
    max_trainable_params: int = 0
    memory_budget_mb: int = 0
    gflops: float | None = None


@dataclass
class RunRecord:
    """What the trial service learns while it runs; results are written from it."""

    out: Path
    agents: dict[str, AgentFigures] = field(default_factory=dict)
    hops: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # test-set evaluation after each round
    excluded: dict[str, str] = field(default_factory=dict)  # agent -> why the plan left it out
    faults: list[dict[str, Any]] = field(default_factory=list)  # what went wrong, when, how it was recovered
    retransmitted: dict[str, int] = field(default_factory=dict)  # agent -> bytes it sent again (its bye)
    # inbound messages refused, by receiver ("coordinator" or an agent id from its bye) and reason
    rejections: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").write_text("")
        (self.out / "rounds.jsonl").unlink(missing_ok=True)

    def record(self, event: Event) -> None:
        """Keep what a controller event says about the run (display is elsewhere)."""
        if isinstance(event, Joined):
            self.joined(event.hello)
        elif isinstance(event, Excluded):
            self.excluded[event.agent] = event.reason
        elif isinstance(event, HopFinished):
            self.hop_done(event.agent, event.report, event.hop_s)
        elif isinstance(event, SaidBye):
            self.bye(event.agent, event.bye)
        elif isinstance(event, RoundEvaluated):
            self.round_done(event.round, event.accuracy, event.loss, event.bytes_so_far)
        elif isinstance(event, Fault):
            self.faults.append(asdict(event))

    def joined(self, hello: Hello) -> None:
        self.agents[hello.agent_id] = AgentFigures(
            hello.agent_id, hello.backend, memory_budget_mb=hello.memory_budget_mb, gflops=hello.gflops
        )

    def hop_done(self, agent: str, done: HopDone, agent_hop_s: float) -> dict[str, Any]:
        fig = self.agents.setdefault(agent, AgentFigures(agent, done.backend))
        fig.hops += 1
        fig.peak_rss_mb = max(fig.peak_rss_mb, done.peak_rss_mb)
        fig.bytes_sent, fig.bytes_received = (
            max(fig.bytes_sent, done.bytes_sent),
            max(fig.bytes_received, done.bytes_received),
        )
        fig.max_trainable_params = max(fig.max_trainable_params, done.trainable_params)
        line = {
            "round": done.round, "hop": done.hop, "agent": agent, "segment": done.segment,
            "train_loss": _num(done.train_loss), "val_loss": _num(done.val_loss), "val_accuracy": _num(done.val_accuracy),
            "steps": done.steps, "samples": done.samples, "trainable_params": done.trainable_params,
            "model_bytes": done.model_bytes, "train_s": round(done.train_s, 3), "hop_s": round(agent_hop_s, 3),
            "model_sha256": done.model_sha256, "agent_peak_rss_mb": round(done.peak_rss_mb, 1),
        }  # fmt: skip
        self.hops.append(line)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        return line

    def round_done(self, round_: int, accuracy: float, loss: float, bytes_so_far: int) -> None:
        entry = {
            "round": round_,
            "test_accuracy": round(accuracy, 6),
            "test_loss": round(loss, 6),
            "bytes": bytes_so_far,
        }
        self.rounds.append(entry)
        with (self.out / "rounds.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def bye(self, agent: str, bye: Bye) -> None:
        fig = self.agents.setdefault(agent, AgentFigures(agent))
        fig.peak_rss_mb = max(fig.peak_rss_mb, bye.peak_rss_mb)
        fig.bytes_sent, fig.bytes_received = bye.bytes_sent, bye.bytes_received
        self.retransmitted[agent] = bye.bytes_retransmitted
        self.rejections[agent] = dict(bye.rejected)

    def summary(
        self,
        base: Mapping[str, Any],
        coordinator_bytes_sent: int,
        checkpoint_bytes: int = 0,
        coordinator_bytes_received: int = 0,
    ) -> dict[str, Any]:
        """``bytes_total``: every payload byte published for the algorithm (evaluation copies excluded and
        reported as ``bytes_checkpoints``). Per direction: each agent's ``bytes_sent``/``bytes_received``
        and the coordinator's ``bytes_coordinator_sent``/``bytes_coordinator_received``."""
        agents = [asdict(a) for a in sorted(self.agents.values(), key=lambda a: a.agent_id)]
        out = dict(base)
        out["bytes_total"] = coordinator_bytes_sent + sum(a["bytes_sent"] for a in agents) - checkpoint_bytes
        out["bytes_checkpoints"] = checkpoint_bytes
        out["bytes_coordinator_sent"] = coordinator_bytes_sent
        out["bytes_coordinator_received"] = coordinator_bytes_received
        out["round_test"] = sorted(self.rounds, key=lambda r: r["round"])
        out["agents"] = agents
        out["hops"] = len(self.hops)
        out["excluded"] = dict(self.excluded)
        out["faults"] = list(self.faults)
        out["rejections"] = {who: dict(self.rejections[who]) for who in sorted(self.rejections, key=_coordinator_first)}
        return out

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.out / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return path

    def plot(self) -> Path | None:
        """training.png: per-hop training loss and local validation accuracy."""
        if not self.hops:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hops = [h["hop"] for h in self.hops]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(hops, [h["train_loss"] for h in self.hops], marker="o")
        ax1.set(xlabel="hop", ylabel="training loss", title="Training loss per hop")
        accuracy = [math.nan if h["val_accuracy"] is None else h["val_accuracy"] for h in self.hops]
        ax2.plot(hops, accuracy, marker="o", color="tab:green")
        ax2.set(xlabel="hop", ylabel="local validation accuracy", title="Accuracy after each hop", ylim=(0, 1))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "training.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _coordinator_first(who: str) -> tuple[bool, str]:
    return who != "coordinator", who


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 6)
