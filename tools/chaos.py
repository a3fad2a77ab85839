"""Chaos on a loopback trial: agents, the coordinator and the broker killed and restarted at seeded times.

First the fault-free reference: the trial (mosquitto with persistence, agent processes with
``--no-calibrate``, the coordinator as a process; tools/loopback.py) runs once undisturbed, which gives
the final model's digest and accuracy and how long the trial's hops take (the *span*: first ``hop_started``
to last ``hop_done``). Then the same trial, same seed, again, with a seeded schedule of 3-6 faults spread
over 10-75 % of that span (at least one of each kind, never two at the same moment; t = 0 is the first
``hop_started``). A fault due after the trial has ended is recorded as not injected.

- ``agent``: SIGKILL an agent process, start it again (same id, cache, data) after a seeded delay;
- ``coordinator``: SIGKILL the coordinator, start it again after a seeded delay with ``--resume RUN_DIR``;
- ``broker``: restart mosquitto, SIGTERM or SIGKILL (back from its last autosave), down a seeded while.

It writes ``OUT/chaos.json`` (the schedule, what the trial reported for each fault, hops retried, bytes
retransmitted, completed hops lost, both runs' accuracy and digest, wall times) and prints it. Processes
and their logs live under ``OUT/reference`` and ``OUT/chaos`` (``logs/``). Exit code 0 when the chaos
trial completed with no completed hop lost, 1 otherwise.

Example::

    PYTHONPATH=. python -m tools.chaos --seed 1 --out runs/chaos-1
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.protocol.envelope import Envelope
from tools.chaos_report import fault_report, journal_hops_finished, lost_completed_hops
from tools.faultkit import Watch
from tools.loopback import LoopbackTrial, model_digest, trained_hops, write_trial_file

log = logging.getLogger("chaos")

KINDS = ("agent", "coordinator", "broker")
BUSY = "busy"  # an agent fault's target: the agent that last reported a hop started


@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # seconds after the trial's first hop_started
    kind: str  # agent | coordinator | broker
    target: str  # an agent id or BUSY, "coordinator" or "broker"
    down_s: float  # how long it stays down before it is started again
    kill: bool = True  # broker: SIGKILL (True) or SIGTERM (False); agents and the coordinator: always SIGKILL


def plan_faults(seed: int, span_s: float, agents: list[str], count: int = 0) -> list[PlannedFault]:
    """A seeded schedule of ``count`` (0: 3-6) faults over ``span_s``, at least one of each kind: the span's
    10-75 % is cut into one slot per fault and each fault falls inside its own slot (no two together; the
    trial under chaos may run faster than the reference did, so the schedule ends well before the span)."""
    rng = random.Random(seed)
    n = count or rng.randint(3, 6)
    kinds = [*KINDS, *(rng.choice(KINDS) for _ in range(max(0, n - len(KINDS))))][:n]
    rng.shuffle(kinds)
    width = 0.65 * span_s / n
    faults = []
    for i, kind in enumerate(kinds):
        at = round(0.1 * span_s + (i + rng.uniform(0.15, 0.85)) * width, 2)
        if kind == "agent":  # half the time whoever is training when it fires ("busy"), else a seeded agent
            target = BUSY if rng.random() < 0.5 else rng.choice(agents)
            faults.append(PlannedFault(at, kind, target, round(rng.uniform(0.5, 3.0), 2)))
        elif kind == "coordinator":
            faults.append(PlannedFault(at, kind, "coordinator", round(rng.uniform(0.0, 2.0), 2)))
        else:
            faults.append(PlannedFault(at, kind, "broker", round(rng.uniform(0.0, 2.0), 2), kill=rng.random() < 0.5))
    return faults


class Progress:
    """Follows the trial on the wire (tools.faultkit.Watch): first hop started, hops done; logs each hop."""

    def __init__(self, port: int) -> None:
        self.first_start: float | None = None
        self.busy: str | None = None  # the agent that last reported a hop started
        self.last_done: float | None = None
        self.started = threading.Event()
        self.done: set[int] = set()
        self.watch = Watch(port, self.on_envelope, name="chaos-watch")

    def on_envelope(self, topic: str, env: Envelope) -> None:
        hop = env.body.get("hop") if isinstance(env.body, dict) else None
        if env.type == "hop_started" and self.first_start is None:
            self.first_start = time.monotonic()
            self.started.set()
        if env.type == "hop_started":
            self.busy = env.src
            log.info("hop %s started on %s", hop, env.src)
        elif env.type == "hop_done" and isinstance(hop, int) and hop not in self.done:
            self.done.add(hop)
            self.last_done = time.monotonic()
            log.info("hop %s done by %s", hop, env.src)

    def close(self) -> None:
        self.watch.close()


class Injector:
    """Runs a fault schedule against a LoopbackTrial; each fault's record says what was done and when."""

    def __init__(self, lt: LoopbackTrial, progress: Progress, t0: float) -> None:
        self.lt, self.progress, self.t0 = lt, progress, t0
        self.timers: list[threading.Timer] = []

    def run(self, faults: list[PlannedFault]) -> list[dict[str, Any]]:
        records = []
        for fault in faults:
            while time.monotonic() < self.t0 + fault.at_s and self._running():
                time.sleep(0.05)
            record: dict[str, Any] = {**asdict(fault), "at_s": round(time.monotonic() - self.t0, 2),
                                      "planned_at_s": fault.at_s, "wall": time.time()}  # fmt: skip
            if fault.kind != "broker":
                record.pop("kill")
            if fault.target == BUSY:
                fault = replace(fault, target=self.progress.busy or "agent-0")
                record["target"], record["busy"] = fault.target, True
            if not self._running():
                record |= {"injected": False, "why_not": "the trial was over"}
            else:
                record |= self._inject(fault)
            records.append(record)
        for timer in self.timers:
            timer.join()
        return records

    def _running(self) -> bool:
        return self.lt.coordinator is not None and self.lt.coordinator.poll() is None

    def _inject(self, fault: PlannedFault) -> dict[str, Any]:
        lt = self.lt
        if fault.kind == "agent":
            argv = lt.kill_agent(fault.target)
            if argv is None:
                log.warning("t=%.1f s: %s is not running; nothing to kill", time.monotonic() - self.t0, fault.target)
                return {"injected": False, "why_not": f"{fault.target} was not running"}
            log.warning("t=%.1f s: SIGKILL %s (back in %.1f s)", time.monotonic() - self.t0, fault.target, fault.down_s)
            timer = threading.Timer(fault.down_s, self._restart_agent, (fault.target, argv))
            timer.start()
            self.timers.append(timer)
        elif fault.kind == "coordinator":
            log.warning(
                "t=%.1f s: SIGKILL the coordinator (resumed in %.1f s)", time.monotonic() - self.t0, fault.down_s
            )
            lt.kill_coordinator()
            time.sleep(fault.down_s)
            lt.resume_coordinator()
            log.info("coordinator started again with --resume (life %d)", lt.lives)
        else:
            how = "SIGKILL" if fault.kill else "SIGTERM"
            log.warning("t=%.1f s: restart mosquitto (%s, down %.1f s)", time.monotonic() - self.t0, how, fault.down_s)
            lt.restart_broker(kill=fault.kill, down_s=fault.down_s)
        return {"injected": True}

    def _restart_agent(self, agent_id: str, argv: list[str]) -> None:
        self.lt.restart_agent(agent_id, argv)
        log.info("%s started again", agent_id)


def run(settings: dict[str, Any], out: Path, faults: list[PlannedFault] | None, timeout_s: float,
        autosave_s: int) -> dict[str, Any]:  # fmt: skip
    """One trial in ``out``; with ``faults``, injected. Returns what chaos.json says of a run."""
    trial = write_trial_file(out / "trial.toml", settings)
    began = time.monotonic()
    records: list[dict[str, Any]] = []
    code: int | None = None
    with LoopbackTrial(trial, out, autosave_s=autosave_s) as lt:
        broker = lt.start_broker()
        progress = Progress(broker.port)
        try:
            lt.start_agents(calibrate=False)
            lt.start_coordinator()
            if not progress.started.wait(timeout_s):
                raise RuntimeError(f"no hop started in {timeout_s:.0f} s:\n{lt.coordinator_log_tail()}")
            assert progress.first_start is not None
            if faults:
                records = Injector(lt, progress, progress.first_start).run(faults)
            code = lt.wait_coordinator(max(1.0, began + timeout_s - time.monotonic()))
        finally:
            progress.close()
        if code != 0:
            log.error("the coordinator %s; its log ends:\n%s",
                      "did not finish in time" if code is None else f"exited with {code}", lt.coordinator_log_tail())  # fmt: skip
    summary = lt.summary()
    span = (progress.last_done or time.monotonic()) - (progress.first_start or began)
    return {
        "completed": code == 0, "exit_code": code, "wall_s": round(time.monotonic() - began, 1),
        "span_s": round(span, 1), "coordinator_lives": lt.lives, "final_test_accuracy": summary.get("final_test_accuracy"),
        "model_digest": model_digest(out), "hops": summary.get("hops"), "resumed": summary.get("resumed", False),
        "hops_retried": summary.get("hops_retried"), "hops_lost": summary.get("hops_lost"),
        "hops_unreported": summary.get("hops_unreported", []),
        "bytes_retransmitted": summary.get("bytes_retransmitted"), "lost_agents": summary.get("lost_agents"),
        "trial_faults": summary.get("faults", []), "faults": records,
    }  # fmt: skip


@dataclass(frozen=True)
class ChaosOptions:
    seed: int
    out: Path
    rounds: int = 4
    agents: int = 3
    samples: int = 2000  # training samples per agent
    epochs: int = 10  # local epochs per hop: longer hops (~2 s), more to hit
    model: str = "mlp"
    faults: int = 0  # 0: a seeded 3-6
    autosave: int = 5  # mosquitto's autosave interval (s): what a SIGKILL of the broker loses
    timeout: float = 600.0  # per run


def chaos(args: ChaosOptions) -> dict[str, Any]:
    """The reference run, then the chaos run; what chaos.json holds."""
    settings = {"name": f"chaos{args.seed}", "model": args.model, "agents": args.agents, "rounds": args.rounds,
                "samples_per_agent": args.samples, "seed": args.seed, "train.batch_size": 32,
                "train.epochs": args.epochs}  # fmt: skip
    log.info("reference run (no faults) in %s", args.out / "reference")
    ref = run(settings, args.out / "reference", None, args.timeout, args.autosave)
    if not ref["completed"]:
        raise SystemExit(f"the fault-free reference failed; see {args.out / 'reference' / 'logs'}")
    agents = [f"agent-{i}" for i in range(args.agents)]
    faults = plan_faults(args.seed, ref["span_s"], agents, args.faults)
    log.info("reference: %.1f s of hops; faults: %s", ref["span_s"],
             ", ".join(f"{f.kind}:{f.target}@{f.at_s}s" for f in faults))  # fmt: skip
    out = args.out / "chaos"
    res = run(settings, out, faults, args.timeout, args.autosave)
    res["faults"] = [r | {"reported": fault_report(out, r, res["faults"])} for r in res["faults"]]
    finished = journal_hops_finished(out)
    res["completed_hops_lost"] = lost_completed_hops(finished)
    res["hops_trained_more_than_once"] = {
        str(h): n for h, n in sorted(sum(trained_hops(out).values(), Counter()).items()) if n > 1
    }
    injected = [r for r in res["faults"] if r["injected"]]
    equal = ref["model_digest"] == res["model_digest"]
    return {
        "seed": args.seed, "settings": settings,
        "faults_injected": len(injected), "faults_survived": len(injected) if res["completed"] else 0,
        "completed": res["completed"], "hops_retried": res["hops_retried"],
        "bytes_retransmitted": res["bytes_retransmitted"], "completed_hops_lost": res["completed_hops_lost"],
        "summary_hops_lost": res["hops_lost"], "digests_equal": equal,
        "accuracy": {"reference": ref["final_test_accuracy"], "chaos": res["final_test_accuracy"]},
        "note": "equal digests: the faults changed nothing the model saw" if equal else
                "digests differ: a hop trained again on another agent, or in another order, changes the model "
                "legitimately (the rerouted plan); compare the accuracy",
        "wall_s": {"reference": ref["wall_s"], "chaos": res["wall_s"]},
        "reference": ref, "chaos": res,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="Seeds the trial and the fault schedule.")
    parser.add_argument("--out", type=Path, help="Run directory (default runs/chaos-SEED).")
    parser.add_argument("--rounds", type=int, default=ChaosOptions.rounds, help="Rounds.")
    parser.add_argument("--agents", type=int, default=ChaosOptions.agents, help="Agent processes.")
    parser.add_argument("--samples", type=int, default=ChaosOptions.samples, help="Training samples per agent.")
    parser.add_argument(
        "--epochs", type=int, default=ChaosOptions.epochs, help="Local epochs per hop (longer hops, more to hit)."
    )
    parser.add_argument("--model", default=ChaosOptions.model, help="Model from the registry.")
    parser.add_argument(
        "--faults", type=int, default=ChaosOptions.faults, help="Faults to inject (0: a seeded 3-6; at least 3)."
    )
    parser.add_argument(
        "--autosave",
        type=int,
        default=ChaosOptions.autosave,
        help="mosquitto's autosave interval (what SIGKILL loses).",
    )
    parser.add_argument("--timeout", type=float, default=ChaosOptions.timeout, help="Seconds each run may take.")
    args = parser.parse_args()
    args.out = args.out or Path("runs") / f"chaos-{args.seed}"
    args.faults = max(args.faults, len(KINDS)) if args.faults else 0
    options = ChaosOptions(**vars(args))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` and atexit stop every process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("coordinator.broker").setLevel(logging.WARNING)
    report = chaos(options)
    (options.out / "chaos.json").write_text(json.dumps(report, indent=2))
    brief = {k: report[k] for k in ("seed", "faults_injected", "faults_survived", "completed", "hops_retried",
                                    "bytes_retransmitted", "completed_hops_lost", "digests_equal", "accuracy", "wall_s")}  # fmt: skip
    print(json.dumps(brief))
    log.info("chaos.json in %s", options.out)
    raise SystemExit(0 if report["completed"] and report["completed_hops_lost"] == 0 else 1)


if __name__ == "__main__":
    main()
