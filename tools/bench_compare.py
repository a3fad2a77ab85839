#!/usr/bin/env python3
"""Benchmark: Snake Learning against FedAvg on the same agents, data and broker.

Runs ``snake-coordinator compare`` (VGG-11-BN on Fashion-MNIST, 4 agents, IID and Dirichlet(0.1)
partitions by default) and writes ``OUT/bench.json`` with the headline ratios measured in that one
run (per-agent peak RSS and total bytes, snake over FedAvg) next to the full report in ``OUT/``.

    python tools/bench_compare.py --out runs/bench-compare [--samples-per-agent 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples-per-agent", type=int, default=2000)
    ap.add_argument("--partitions", default="iid,dirichlet:0.1")
    ap.add_argument("--algorithms", default="snake,fedavg,split,snake+kd,snake+fp16")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--agent-backends", default="", help="e.g. portable (default: the installed ORT backend)")
    args = ap.parse_args()
    cmd = [
        sys.executable, "-m", "coordinator.cli", "compare", "--model", args.model, "--agents", str(args.agents),
        "--rounds", str(args.rounds), "--samples-per-agent", str(args.samples_per_agent), "--partitions",
        args.partitions, "--algorithms", args.algorithms, "--target", str(args.target), "--out", str(args.out),
        "--json", "--log-level", "warning",
    ]  # fmt: skip
    if args.agent_backends:
        cmd += ["--agent-backends", args.agent_backends]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"compare failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    result = json.loads(proc.stdout)
    bench = {"command": " ".join(cmd[1:]), "wall_s": round(time.monotonic() - started, 1), **result}
    (args.out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    for r in result["ratios"]:
        print(json.dumps(r))
    print(f"report: {args.out}/report.md, figures: {args.out}/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
