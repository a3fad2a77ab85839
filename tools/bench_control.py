"""Benchmark: the control plane at fleet scale.

(a) Planning (``snake_plan``) for fleets of 10, 100 and 1,000 agents, as ``snake-coordinator plan
--agents N`` plans them (alike agents of typical speed and footprint, 4 rounds) and for a mixed fleet
(budgets from 100 MiB to unlimited, speeds 12-300 GFLOP/s, both backends): the median of a few runs.

(b) Whole in-memory trials (``tools/inmemory.py``: the real coordinator and N real agents over the
in-memory broker, fake trainers): wall time, per-phase times (join, plan, build, hops, shutdown),
hops per second early and late in the trial (a quadratic loop shows as a falling rate), messages and
bytes through the broker, and memory (a second run): the coordinator's state at the plan, the first hop
and the end, and the process's peak RSS (the broker and every agent included).

    python -m tools.bench_control --agents 1000 --out bench_control.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

from coordinator.costmodel import TYPICAL_BASELINE_MB, TYPICAL_GFLOPS
from coordinator.events import Event
from coordinator.plan import AgentProfile
from coordinator.scheduler import snake_plan
from tools.inmemory import InMemoryTrial, layer_groups

MIB = float(1 << 20)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fleet(size: int, kind: str) -> list[AgentProfile]:
    """``alike``: what ``snake-coordinator plan --agents N`` plans for (Fashion-MNIST shared out, one
    epoch); ``mixed``: boards of several kinds, some too small to train anything."""
    if kind == "alike":
        samples = int(60_000 * 0.9) // size
        data_mb = samples / 0.9 * 784 / MIB
        return [AgentProfile(f"agent-{i}", 0.0, TYPICAL_BASELINE_MB["ort"], TYPICAL_GFLOPS, "ort", samples, data_mb)
                for i in range(size)]  # fmt: skip
    rng = random.Random(size)
    return [
        AgentProfile(
            f"agent-{i}",
            rng.choice([0.0, 100.0, 300.0, 512.0, 1024.0]),
            rng.choice([78.0, 77.0]),
            rng.choice([12.0, 30.0, 100.0, 300.0, None]),
            rng.choice(["ort", "portable"]),
            54,
        )  # fmt: skip
        for i in range(size)
    ]


def bench_planning(sizes: list[int], layout: str, rounds: int, repeats: int) -> list[dict[str, Any]]:
    groups, out = layer_groups(layout), []
    for kind in ("alike", "mixed"):
        for size in sizes:
            agents, runs = fleet(size, kind), []
            for _ in range(repeats):
                t = time.perf_counter()
                plan = snake_plan(agents, groups, rounds)
                runs.append(time.perf_counter() - t)
            row = {"fleet": kind, "agents": size, "layout": layout, "rounds": rounds, "hops": len(plan.hops),
                   "left_out": len(plan.excluded), "median_s": statistics.median(runs), "runs_s": runs}  # fmt: skip
            say(f"plan  {kind:5} {size:5} agents: median {row['median_s']:.3f} s of {repeats} ({len(plan.hops)} hops)")
            out.append(row)
    return out


def bench_trial(size: int, layout: str, rounds: int, scale: float, memory: bool, traced: bool) -> dict[str, Any]:
    """One in-memory trial (timed), then, if ``memory``, the same trial again under tracemalloc."""
    row: dict[str, Any] = {"agents": size, "layout": layout, "rounds": rounds, "tensor_scale": scale}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        trial = InMemoryTrial(Path(tmp), size, layout, rounds, scale=scale, on_event=_progress(size * rounds))
        row["setup_s"] = time.perf_counter() - t
        trial.run()
        if trial.ctl.failed or trial.ctl.final_model is None:
            raise SystemExit(f"the {size}-agent trial failed: {trial.ctl.failed}")
        done = trial.timeline.hops_done
        tenth = max(1, len(done) // 10)
        row |= {
            "phases_s": trial.timeline.phases(),
            "hops": len(done),
            "hops_per_s_first_tenth": tenth / max(done[tenth - 1] - trial.timeline.built, 1e-9),
            "hops_per_s_last_tenth": tenth / max(done[-1] - done[-tenth - 1], 1e-9) if len(done) > tenth else None,
            "broker_messages": dict(trial.traffic.messages),
            "broker_bytes": dict(trial.traffic.sizes),
            "simulated_s": trial.clock.now - 1_000.0,
        }
    say(f"trial {size:5} agents: wall {row['phases_s']['wall_s']:.2f} s " + _phases(row["phases_s"]))
    if memory:
        row["memory"] = _memory_run(size, layout, rounds, scale, traced)
        say(f"      memory: coordinator state {row['memory']['coordinator_mb']:.1f} MiB, process peak RSS "
            f"{row['memory']['process_max_rss_mb']:.0f} MiB")  # fmt: skip
    return row


def _phases(p: dict[str, float]) -> str:
    return " ".join(f"{k[:-2]} {v:.2f}" for k, v in p.items() if k != "wall_s")


def _progress(total: int) -> Any:
    seen, step = [0], max(1, total // 10)

    def on_event(event: Event) -> None:
        if type(event).__name__ == "HopFinished":
            seen[0] += 1
            if seen[0] % step == 0 or seen[0] == total:
                say(f"      hops {seen[0]}/{total}")

    return on_event


def _memory_run(size: int, layout: str, rounds: int, scale: float, traced: bool) -> dict[str, Any]:
    """The trial again, for memory: the coordinator's state (``deep_size`` of its ``Controller``: hellos,
    plan, tasks, artifacts, reports, outbox, models) when the plan is made, when the first hop starts
    and when the final model arrives; the process's peak RSS; with ``traced``, the whole process's traced
    peak (tracemalloc, several times slower: the broker and every agent included, an upper bound)."""
    marks: dict[str, float] = {}
    trial: InMemoryTrial | None = None

    def on_event(event: Event) -> None:
        mark = {"Planned": "planned", "HopBegan": "hops_began", "Finished": "finished"}.get(type(event).__name__)
        if mark and mark not in marks and trial is not None:
            marks[mark] = deep_size(trial.ctl) / MIB

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if traced:
            tracemalloc.start(1)
        try:
            trial = InMemoryTrial(Path(tmp), size, layout, rounds, scale=scale, on_event=on_event)
            trial.run()
            if traced:
                out["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / MIB
        finally:
            tracemalloc.stop()
    return out | {
        "coordinator_mb": max(marks.values()),
        "coordinator_mb_at": marks,
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def deep_size(root: object) -> int:
    """Bytes of ``root`` and everything it references, each object once; code (functions, methods,
    classes, modules) is not followed, so a callback does not drag in its owner."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, SKIP):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


SKIP = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType, logging.Logger)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000, help="the largest fleet (planning and trial)")
    ap.add_argument("--out", type=Path, default=Path("bench_control.json"), help="where to write the figures")
    ap.add_argument("--layout", choices=["cnn", "mlp"], default="cnn", help="the model's layer groups")
    ap.add_argument("--plan-rounds", type=int, default=4, help="rounds planned (the trial default)")
    ap.add_argument("--repeats", type=int, default=5, help="planning runs per fleet (the median is reported)")
    ap.add_argument("--trial-rounds", type=int, default=1, help="rounds of the in-memory trials")
    ap.add_argument("--tensor-scale", type=float, default=0.01,
                    help="tensor floats per parameter in the trials (1.0: the real model's bytes travel)")  # fmt: skip
    ap.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    ap.add_argument("--traced-peak", action="store_true", help="memory runs under tracemalloc (several times slower)")
    args = ap.parse_args(argv)
    sizes = sorted({n for n in (10, 100, args.agents) if n <= args.agents})
    trials = sorted({n for n in (100, args.agents) if n <= args.agents})
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg": os.getloadavg(),
        },  # fmt: skip
        "planning": bench_planning(sizes, args.layout, args.plan_rounds, args.repeats),
        "trials": [
            bench_trial(n, args.layout, args.trial_rounds, args.tensor_scale, not args.no_memory, args.traced_peak)
            for n in trials
        ],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
