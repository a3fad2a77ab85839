#!/usr/bin/env python3
"""Benchmark: one agent process's peak memory (VmHWM) for one hop, Snake Learning segment vs FedAvg.

The parent (coordinator venv, has torch) exports the model, builds the artifacts and lets the real
pure ``Controller`` produce what an agent receives for its first hop (the assignment and the chunk
frames of the whole model, for a snake hop on each segment of round 0 and for a FedAvg hop; a
snake hop after the first gets the initial model from its predecessor, re-chunked as that agent
would send it). Each measurement
is a fresh agent process (the real ``AgentService`` on an in-memory link)
that is fed those messages one by one, trains the hop, hands the model on and prints its peak RSS.
A snake agent's peak is the worst segment (the agent that trains it); FedAvg trains everything.

    python tools/bench_agent_memory.py --out runs/agent-memory.json [--model vgg11] [--repeats 3]
        [--backends ort,portable] [--portable-python /path/to/venv-with-onnxruntime/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def write_messages(path: Path, messages: list[tuple[str, bytes]]) -> None:
    with path.open("wb") as fh:
        for topic, payload in messages:
            t = topic.encode()
            fh.write(struct.pack("<IQ", len(t), len(payload)) + t)
            fh.write(payload)


def read_messages(path: Path) -> Any:
    with path.open("rb") as fh:
        while head := fh.read(12):
            tlen, plen = struct.unpack("<IQ", head)
            yield fh.read(tlen).decode(), fh.read(plen)


_MEMO: dict[str, Any] = {}


# -- parent: build the inputs --------------------------------------------------------------------
def build_case(args: argparse.Namespace, work: Path, algorithm: str, segment: int, backend: str) -> Path:
    """A directory with the agent's data, artifact store and the messages of its first hop."""
    from coordinator.config import load_trial
    from coordinator.controller import Controller
    from coordinator.events import BuildArtifacts, Built
    from coordinator.partitions import write_partitions
    from coordinator.prepare import prepare
    from coordinator.trial import input_spec, trial_setup
    from edge_agent.data import load_dataset
    from edge_agent.protocol import topics
    from edge_agent.protocol.envelope import Envelope, decode, encode
    from edge_agent.protocol.messages import Hello, to_body
    from edge_agent.protocol.transfer import Outbox

    overrides = {
        "model": args.model, "agents": 4, "rounds": 1,
        "algorithm": algorithm, "samples_per_agent": args.samples, "train.batch_size": args.batch_size,
        "train.max_steps": args.steps,
    }  # fmt: skip
    config = load_trial(None, overrides)
    if "ds" not in _MEMO:
        _MEMO["ds"] = load_dataset(config.dataset)
    ds = _MEMO["ds"]
    npz = write_partitions(config, ds, work / "data")[0]
    if algorithm not in _MEMO:  # segments and artifacts do not depend on the number of rounds
        _MEMO[algorithm] = prepare(config, input_spec(ds), work / f"prepare-{algorithm}")
    prepared = _MEMO[algorithm]
    setup = trial_setup(config, prepared)
    ctl = Controller(setup, time.time())
    out = []
    for i in range(4):
        hello = Hello(
            f"agent-{i}", backend, {}, "x86_64", "Linux", "3.11", 2, 4096, 4096, args.samples, 0, ds.num_classes,
            list(ds.input_shape), [0] * ds.num_classes,
        )  # fmt: skip
        env = Envelope("hello", hello.agent_id, topics.COORDINATOR, to_body(hello), created_at=time.time())
        step = ctl.handle(topics.coordinator_inbox(), encode(env), time.time())
        out += step.out
        for job in step.jobs:  # the plan's artifacts, built here as the coordinator's worker would
            assert isinstance(job, BuildArtifacts)
            out += ctl.job_done(job, Built(*prepared.artifacts_for(job.plan)), time.time()).out
    case = work / f"case-{algorithm}-{segment}-{backend}"
    case.mkdir(parents=True, exist_ok=True)
    assert ctl.plan is not None
    hop = ctl.plan.hops[0] if algorithm == "fedavg" else next(h for h in ctl.plan.hops if h.segment == segment)
    agent = hop.agent
    mine = [(o.topic, o.payload) for o in out if o.topic == topics.agent_inbox(agent)]
    if hop.hop > 0:  # the model comes from the previous hop's agent: the initial model, as it would chunk it
        frames = [decode(o.payload) for o in out if o.topic == topics.agent_inbox(ctl.plan.hops[0].agent)]
        chunks = sorted((e.body["seq"], e.data or b"") for e in frames if e.type == "chunk")
        meta = {"hop": hop.hop, "from_hop": hop.hop - 1, "round": hop.round}
        prev = ctl.plan.hops[hop.hop - 1].agent
        _, sent = Outbox(prev).send(
            agent, setup.trial_id, "model", meta, b"".join(c for _, c in chunks), setup.chunk_bytes, time.time()
        )
        mine += [(o.topic, o.payload) for o in sent]
    write_messages(case / "messages.bin", mine)
    first = next(t for t in ctl.tasks[agent] if t.hop == hop.hop)
    (case / "blob").write_bytes(ctl.blobs[first.artifact_sha256])
    info = {"sha256": first.artifact_sha256, "npz": str(npz), "agent": agent, "segment": list(first.groups)}
    (case / "case.json").write_text(json.dumps(info))
    return case


def measure(case: Path, python: str, run: int) -> dict[str, Any]:
    cmd = [python, __file__, "--child", str(case), "--run", str(run)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy(), timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- child: one agent process, one hop -----------------------------------------------------------
def child(case: Path, run: int, backend: str) -> None:
    from edge_agent import profile
    from edge_agent.bundle import ArtifactStore
    from edge_agent.config import AgentConfig
    from edge_agent.link import SystemClock
    from edge_agent.localdata import load_local
    from edge_agent.memlink import MemoryBroker, MemoryLink
    from edge_agent.protocol import topics
    from edge_agent.service import AgentService

    info = json.loads((case / "case.json").read_text())
    cache = case / f"run-{run}-{os.getpid()}"
    ArtifactStore(cache / "artifacts").put(info["sha256"], (case / "blob").read_bytes())
    config = AgentConfig(info["agent"], "mqtt://127.0.0.1:1", f"npz:{info['npz']}", cache_dir=cache, backend=backend)
    broker = MemoryBroker(SystemClock(), record=False)
    link = MemoryLink(broker, info["agent"], [topics.agent_inbox(info["agent"])])
    watcher = MemoryLink(broker, "watcher", [topics.coordinator_inbox()])
    watcher.start()
    service = AgentService(config, load_local(config), link)
    service.start()
    idle_mb = profile.peak_rss_mb()
    started = time.monotonic()
    for topic, payload in read_messages(case / "messages.bin"):
        broker.publish(topic, payload)
    done = False
    while not done:
        service.poll(timeout=0.02)
        while (msg := watcher.get(timeout=0)) is not None:
            done |= msg.payload[:1] == b"{" and json.loads(msg.payload)["type"] == "hop_done"
    peak = profile.peak_rss_mb()
    service.pool.shutdown(wait=True)
    print(json.dumps({"peak_rss_mb": round(peak, 1), "before_hop_mb": round(idle_mb, 1),
                      "hop_s": round(time.monotonic() - started, 1),
                      "bytes_sent": link.counters().bytes_sent}))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("runs/agent-memory-work"))
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the commit measured)")
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="ort,portable")
    ap.add_argument("--portable-python", default=sys.executable, help="interpreter with plain onnxruntime")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.run, json.loads((args.child / "backend.json").read_text()))
        return 0
    if args.out is None:
        ap.error("--out is required")
    result: dict[str, Any] = {"label": args.label, "model": args.model, "samples": args.samples,
                              "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats}  # fmt: skip
    for backend in args.backends.split(","):
        python = args.portable_python if backend == "portable" else sys.executable
        cases = {f"snake-s{k}": build_case(args, args.work, "snake", k, backend) for k in range(4)}
        cases["fedavg"] = build_case(args, args.work, "fedavg", 0, backend)
        figures: dict[str, list[float]] = {}
        for name, case in cases.items():
            (case / "backend.json").write_text(json.dumps(backend))
            figures[name] = [measure(case, python, r)["peak_rss_mb"] for r in range(args.repeats)]
            print(backend, name, figures[name], file=sys.stderr)
        medians = {name: statistics.median(v) for name, v in figures.items()}
        snake = max(v for name, v in medians.items() if name.startswith("snake"))
        result[backend] = {"runs_mb": figures, "median_mb": medians, "snake_worst_segment_mb": snake,
                           "fedavg_mb": medians["fedavg"], "snake_over_fedavg": round(snake / medians["fedavg"], 3)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({b: result[b]["snake_over_fedavg"] for b in args.backends.split(",")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
