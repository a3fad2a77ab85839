"""Check the planner's memory cost model against measured training memory.

For each case (model, trained layer groups, batch size, backend) the coordinator side builds the
segment bundle; a fresh torch-free subprocess (the worker of ``bench_backends.py``) loads the
weights, trains a few steps and reports its peak RSS. The trainer's share is the peak minus
the RSS after imports; :func:`coordinator.costmodel.trainer_memory` predicts that share from the
layer-group costs alone. Example::

    python tools/bench_costmodel.py --out /tmp/costmodel.json [--fit] [--backends ort]

Writes every case's measured and estimated MiB and their ratio; the stated tolerance of the
model is the worst ratio seen here (see the module docstring of ``coordinator/costmodel.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_backends  # noqa: E402  (the torch-free training worker)

logger = logging.getLogger("bench_costmodel")

CASES = [  # model, first group, last group (inclusive), batch
    ("cnn", "conv0", "head", 64),
    ("cnn", "head", "head", 64),
    ("vgg11", "features.0", "classifier.2", 32),
    ("vgg11", "features.0", "features.1", 32),
    ("vgg11", "features.5", "features.7", 32),
    ("vgg11", "classifier.0", "classifier.2", 32),
    ("vgg11", "features.0", "classifier.2", 64),
    ("vgg11", "classifier.0", "classifier.2", 64),
    ("vgg11", "features.2", "features.4", 48),
    ("vgg11", "features.6", "classifier.1", 16),
    ("cnn", "conv1", "fc", 32),
    ("cnn", "conv0", "conv1", 128),
]
INPUT_SHAPE = (1, 28, 28)


def _model(name: str, work: Path) -> tuple[Any, Any]:
    import torch

    from coordinator.export import export_forward
    from coordinator.prepare import group_infos
    from models import InputSpec, build_model

    torch.manual_seed(0)
    model = build_model(name, InputSpec())
    forward = export_forward(model, INPUT_SHAPE, 10, work / f"export-{name}")
    return forward, group_infos(forward, model)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from coordinator.build.artifacts import build_segment_artifacts
    from coordinator.build.portable_artifacts import build_portable_artifacts
    from coordinator.costmodel import memory_terms, trainer_memory, within_tolerance

    report: dict[str, Any] = {
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {"steps": args.steps, "repeats": args.repeats, "optimizer": "adamw"},
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-costmodel-") as scratch:
        work = Path(scratch)
        models: dict[str, Any] = {}
        for name, first, last, batch in args.case or CASES:
            if args.models and name not in args.models:
                continue
            if name not in models:
                models[name] = _model(name, work)
            forward, groups = models[name]
            names = [g.name for g in groups]
            lo, hi = names.index(first), names.index(last) + 1
            trainable = forward.params_of(names[lo:hi])
            bundles = {
                "ort": build_segment_artifacts(forward, trainable, work / "cache").directory,
                "portable": build_portable_artifacts(forward, trainable, work / "cache").directory,
            }
            folder = work / f"{name}-{lo}-{hi}-{batch}"
            folder.mkdir()
            save: Any = np.savez
            save(folder / "weights.npz", **forward.tensors)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((batch * 4, *INPUT_SHAPE)).astype(np.float32)
            np.savez(folder / "data.npz", x=x, y=rng.integers(0, 10, batch * 4))
            for backend in args.backends:
                measured = []
                for _ in range(args.repeats):
                    out = bench_backends._run_worker(sys.executable, backend, bundles[backend], folder, batch, args)
                    if "error" in out:
                        raise SystemExit(f"{name} {first}..{last} {backend}: {out['error']}")
                    measured.append(out["peak_rss_mb"] - out["rss_after_imports_mb"])
                estimate = trainer_memory(groups, lo, hi, batch, "adamw", backend)
                case = {
                    "model": name,
                    "groups": f"{first}..{last}",
                    "batch": batch,
                    "backend": backend,
                    "trainable_params": int(sum(g.num_params for g in groups[lo:hi])),
                    "measured_mb": round(float(np.median(measured)), 1),
                    "measured_all_mb": [round(m, 1) for m in measured],
                    "estimated_mb": round(estimate.total_mb, 1),
                    "estimate": estimate.as_dict(),
                }
                case["features"] = list(memory_terms(groups, lo, hi, batch))
                case["ratio"] = round(case["estimated_mb"] / max(case["measured_mb"], 1e-6), 3)
                case["within_tolerance"] = within_tolerance(case["estimated_mb"], case["measured_mb"], backend)
                report["cases"].append(case)
                logger.info("%s %s b%d %s: measured %.1f MiB, estimated %.1f MiB (x%.2f)", name, case["groups"],
                            batch, backend, case["measured_mb"], case["estimated_mb"], case["ratio"])  # fmt: skip
    ratios = [c["ratio"] for c in report["cases"]]
    report["ratio_min"], report["ratio_max"] = min(ratios), max(ratios)
    report["all_within_tolerance"] = all(c["within_tolerance"] for c in report["cases"])
    return report


def fit(report: dict[str, Any]) -> dict[str, Any]:
    """Least-squares coefficients per backend (``costmodel.Coefficients`` order; negative ones are
    dropped and the rest refitted), with the fit's worst residual in MiB and as a fraction."""
    out: dict[str, Any] = {}
    for backend in sorted({c["backend"] for c in report["cases"]}):
        cases = [c for c in report["cases"] if c["backend"] == backend]
        a = np.array([c["features"] for c in cases])
        b = np.array([c["measured_mb"] for c in cases])
        active = list(range(a.shape[1]))
        while True:
            coef = np.zeros(a.shape[1])
            coef[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                break
            active.remove(min(negative, key=lambda i: coef[i]))
        residual = a @ coef - b
        out[backend] = {
            "coefficients": [round(float(v), 3) for v in coef],
            "worst_residual_mb": round(float(np.abs(residual).max()), 1),
            "worst_residual_fraction": round(float(np.max(np.abs(residual) / b)), 3),
        }
    return out


def _case(text: str) -> tuple[str, str, str, int]:
    model, first, last, batch = text.split(":")
    return model, first, last, int(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--models", nargs="*", choices=["cnn", "vgg11"], help="only these models")
    parser.add_argument("--case", action="append", type=_case, help="MODEL:FIRST_GROUP:LAST_GROUP:BATCH (repeatable)")
    parser.add_argument("--backends", nargs="+", default=["ort", "portable"], choices=["ort", "portable"])
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per case (median kept)")
    parser.add_argument("--fit", action="store_true", help="also fit the coefficients to these cases")
    args = parser.parse_args()
    args.warmup, args.threads = 0, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args)
    if args.fit:
        report["fit"] = fit(report)
        for backend, result in report["fit"].items():
            logger.info("%s: Coefficients%s, worst residual %.1f MiB (%.0f %%)", backend,
                        tuple(result["coefficients"]), result["worst_residual_mb"],
                        100 * result["worst_residual_fraction"])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
