"""Compare the trainer backends on the same segments: step time, peak memory, bundle size.

For each segment (cnn and vgg11 by default) the coordinator side builds the ORT bundle
and the portable bundle; then each backend trains in its own subprocess (so peak RSS
is that backend's alone): ``ort`` (onnxruntime-training), ``portable`` on the same
onnxruntime-training build, and, with ``--portable-python``, ``portable`` on plain
onnxruntime in another environment. Step time is the median over ``--steps`` optimizer
steps after ``--warmup`` steps. Example::

    python tools/bench_backends.py --out /tmp/bench.json --portable-python /work/venv-portable/bin/python

Run it in the main environment (torch, onnxruntime-training). Workers import only edge_agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench_backends")

SEGMENTS = {  # name: (model, layer groups, batch size)
    "cnn/conv1+fc": ("cnn", ("conv1", "fc"), 32),
    "vgg11/features.0-1 (front)": ("vgg11", ("features.0", "features.1"), 16),
    "vgg11/classifier (back)": ("vgg11", ("classifier.0", "classifier.1", "classifier.2"), 16),
}
INPUT_SHAPE = (1, 28, 28)


# -- worker (runs in a subprocess; imports only edge_agent) -------------------------------------


def _rss_mb() -> float:
    from edge_agent.profile import peak_rss_mb

    return peak_rss_mb()  # VmHWM: ru_maxrss would include this process's parent (it survives exec)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``warmup + steps`` steps on one bundle; time each step from the step callback."""
    from edge_agent.backends import make_trainer
    from edge_agent.ort_training import import_onnxruntime
    from edge_agent.profile import map_large_allocations, return_free_memory
    from edge_agent.trainer import TrainSpec

    map_large_allocations()  # as the agent does at start
    onnxruntime = import_onnxruntime()  # without the training build's torch probe, as the trainers do
    rss_imports = _rss_mb()
    data = np.load(args.data)
    started = time.perf_counter()
    trainer = make_trainer(args.backend, threads=args.threads)
    trainer.open(Path(args.bundle))
    trainer.set_weights(dict(np.load(args.weights)))  # a temporary, as the agent passes its received model
    return_free_memory()
    load_seconds = time.perf_counter() - started
    stamps: list[float] = []
    total = args.warmup + args.steps
    spec = TrainSpec(epochs=total, batch_size=args.batch, lr=1e-3, max_steps=total)
    begun = time.perf_counter()
    trainer.train(data["x"], data["y"], spec, on_step=lambda *_: stamps.append(time.perf_counter()))
    times = np.diff([begun, *stamps])[args.warmup :] * 1000
    trainer.evaluate(data["x"], data["y"], args.batch)  # the agent evaluates after training, in training-sized batches
    return {
        "backend": args.backend,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "steps_timed": len(times),
        "step_ms_median": round(float(np.median(times)), 2),
        "step_ms_p90": round(float(np.quantile(times, 0.9)), 2),
        "load_seconds": round(load_seconds, 3),
        "rss_after_imports_mb": round(rss_imports, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
    }


# -- coordinator side ----------------------------------------------------------------------------


def _prepare(name: str, work: Path, cache: Path) -> dict[str, Any]:
    """Export the model, build both bundles, write weights and a data set for the workers."""
    import torch

    from coordinator.build.artifacts import build_segment_artifacts
    from coordinator.build.portable_artifacts import build_portable_artifacts
    from coordinator.export import export_forward
    from models import InputSpec, build_model

    model_name, groups, batch = SEGMENTS[name]
    torch.manual_seed(0)
    forward = export_forward(build_model(model_name, InputSpec()), INPUT_SHAPE, 10, work / f"export-{model_name}")
    trainable = forward.params_of(groups)
    ort = build_segment_artifacts(forward, trainable, cache, optimizer="adamw")
    portable = build_portable_artifacts(forward, trainable, cache, optimizer="adamw")
    folder = work / name.replace("/", "_").replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    save: Any = np.savez  # numpy's stubs take **kwds as savez's own options
    save(folder / "weights.npz", **forward.tensors)
    rng = np.random.default_rng(0)
    samples = batch * 8
    x = rng.standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    np.savez(folder / "data.npz", x=x, y=rng.integers(0, 10, samples))
    return {
        "model": model_name,
        "groups": list(groups),
        "batch": batch,
        "trainable_params": int(sum(forward.tensors[n].size for n in trainable)),
        "bundle_bytes": {"ort": len(ort.blob), "portable": len(portable.blob)},
        "_bundles": {"ort": ort.directory, "portable": portable.directory},
        "_folder": folder,
    }


def _run_worker(python: str, backend: str, bundle: Path, folder: Path, batch: int, args: argparse.Namespace) -> Any:
    command = [python, str(Path(__file__).resolve()), "--worker", "--backend", backend, "--bundle", str(bundle)]
    command += ["--weights", str(folder / "weights.npz"), "--data", str(folder / "data.npz"), "--batch", str(batch)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["worker failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _runs(prepared: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Each backend ``--repeats`` times, round-robin (a shared machine drifts); keep the fastest run's figures."""
    bundles, folder, batch = prepared["_bundles"], prepared["_folder"], prepared["batch"]
    variants = [("ort", sys.executable, "ort"), ("portable (onnxruntime-training build)", sys.executable, "portable")]
    if args.portable_python:
        variants.append(("portable (plain onnxruntime)", args.portable_python, "portable"))
    results: dict[str, list[Any]] = {label: [] for label, _, _ in variants}
    for _ in range(args.repeats):
        for label, python, backend in variants:
            results[label].append(_run_worker(python, backend, bundles[backend], folder, batch, args))
    runs = {}
    for label, tries in results.items():
        good = [t for t in tries if "error" not in t]
        best = min(good, key=lambda t: t["step_ms_median"]) if good else tries[0]
        runs[label] = {**best, "step_ms_medians_all_runs": [t.get("step_ms_median") for t in tries]}
    return runs


def bench(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "repeats": args.repeats,
            "optimizer": "adamw",
        },
        "segments": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as scratch:
        work = Path(scratch)
        for name in args.segments:
            prepared = _prepare(name, work, work / "cache")
            prepared["runs"] = _runs(prepared, args)
            report["segments"][name] = {k: v for k, v in prepared.items() if not k.startswith("_")}
            logger.info("%s: %s", name, json.dumps(report["segments"][name]["runs"]))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON report to write (coordinator side)")
    parser.add_argument("--segments", nargs="+", default=list(SEGMENTS), choices=list(SEGMENTS))
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per backend, round-robin; the fastest is kept")
    parser.add_argument("--portable-python", help="a plain-onnxruntime interpreter for a third run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--backend", "--bundle", "--weights", "--data"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(worker(args)) + "\n")  # the parent reads the last line
        return 0
    if args.out is None:
        parser.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
