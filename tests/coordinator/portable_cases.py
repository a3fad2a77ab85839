"""Write a portable case directory (see tests/portable/layout.py) for the plain-onnxruntime tests.

Runs where onnxruntime-training and torch are installed (the main environment):

    python -m tests.coordinator.portable_cases --out DIR

Then, in an environment with plain onnxruntime and no torch:

    SNAKELEARN_PORTABLE_CASES=DIR python -m pytest tests/portable -m portable
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tests.portable.layout import SEGMENT_CASES, TOY_SEGMENTS

if TYPE_CHECKING:
    from coordinator.export import ForwardModel

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def write_ops(out: Path) -> int:
    """Every operator case: the lowered graph, its inputs and the training kernel's outputs."""
    import onnx

    from tests.coordinator.lowering_cases import all_cases, lowered_model, original_model, run

    folder = out / "ops"
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for case in all_cases():
        expected = run(original_model(case), case)
        onnx.save(lowered_model(case, expected), folder / f"{case.name}.onnx")
        arrays = {f"in:{k}": v for k, v in case.inputs.items()}
        arrays |= {f"out:{name}": value for (name, _), value in zip(case.outputs, expected, strict=True)}
        np.savez(folder / f"{case.name}.npz", **arrays)
        outputs = [name for name, _ in case.outputs]
        index.append({"name": case.name, "outputs": outputs, "seed": case.seed, "rtol": case.rtol, "atol": case.atol})
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    return len(index)


def export_models(out: Path) -> Callable[[str], ForwardModel]:
    """Forward exports as the coordinator tests make them (seed 0, non-trivial BatchNorm stats), cached."""
    import torch

    from coordinator.export import export_forward
    from models import InputSpec, build_model
    from models.vgg import VGG, VGGConfig
    from tests.coordinator.conftest import _nontrivial_batchnorm
    from tests.coordinator.gpt_tiny import export_tiny_gpt

    cache: dict[str, ForwardModel] = {}

    def get(name: str) -> ForwardModel:
        if name == "gpt_tiny" and name not in cache:  # a causal LM: no BatchNorm, its own input shape
            cache[name] = export_tiny_gpt(out / f"export-{name}")
        if name not in cache:
            torch.manual_seed(0)
            if name == "vgg_dropout":  # a small VGG with dropout 0.5 in its classifier
                model = VGG(VGGConfig(layout=(8, "M", 16, "M"), hidden=32, dropout=0.5))
            else:
                model = build_model(name, InputSpec())
            _nontrivial_batchnorm(model, seed=1)
            cache[name] = export_forward(model, INPUT_SHAPE, NUM_CLASSES, out / f"export-{name}")
        return cache[name]

    return get


def _samples(forward: ForwardModel, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and labels: images and classes, or token ids and next-token labels for a language model."""
    from coordinator.export import TASK_CAUSAL_LM
    from tests.coordinator.gpt_tiny import token_batch

    if forward.task == TASK_CAUSAL_LM:
        return token_batch(forward, samples, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *forward.input_shape)).astype(np.float32)
    return x, rng.integers(0, forward.num_classes, samples).astype(np.int64)


def write_segments(out: Path, forward_of: Callable[[str], ForwardModel], cache: Path) -> int:
    """Each segment case: its portable bundle, start weights, batch and what OrtTrainer made of them."""
    from coordinator.build.artifacts import build_segment_artifacts
    from coordinator.build.portable_artifacts import build_portable_artifacts
    from edge_agent.ort_trainer import OrtTrainer
    from edge_agent.trainer import TrainSpec

    for name, (model, groups, samples, batch, optimizer, epochs, lr) in SEGMENT_CASES.items():
        forward = forward_of(model)
        trainable = forward.params_of(groups)
        folder = out / "segments" / name
        folder.mkdir(parents=True, exist_ok=True)
        portable = build_portable_artifacts(forward, trainable, cache, optimizer=optimizer)
        shutil.copytree(portable.directory, folder / "bundle")
        x, y = _samples(forward, samples, seed=len(name))
        spec = TrainSpec(epochs=epochs, batch_size=batch, lr=lr, seed=3)
        trainer = OrtTrainer(threads=2)
        trainer.open(build_segment_artifacts(forward, trainable, cache, optimizer=optimizer).directory)
        trainer.set_weights(forward.tensors)
        stats = trainer.train(x, y, spec)
        after = trainer.get_weights()
        evaluation = trainer.evaluate(x, y)
        changed = {n: after[n] for n in forward.order if n in trainable or n in forward.buffers}
        np.savez(folder / "weights.npz", **forward.tensors)
        np.savez(folder / "data.npz", x=x, y=y)
        figures = {"stats:train_loss": stats.loss, "stats:eval_loss": evaluation.loss}
        figures["stats:eval_accuracy"] = evaluation.accuracy
        np.savez(folder / "expected.npz", **changed, **{k: np.array(v) for k, v in figures.items()})
        spec_json = {"epochs": epochs, "batch_size": batch, "lr": lr, "seed": 3, "steps": stats.steps}
        (folder / "spec.json").write_text(json.dumps(spec_json))
    return len(SEGMENT_CASES)


def write_toy(out: Path) -> int:
    """Toy-model bundles (onnx.helper MLP, optional BatchNorm) and a separable 3-class data set."""
    from coordinator.build.lowering import lower_segment
    from coordinator.build.ort_artifacts import generate_segment
    from tests.edge_agent.conftest import build_toy_onnx

    folder = out / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    for batchnorm in (False, True):
        toy = build_toy_onnx(folder / f"forward-bn{int(batchnorm)}.onnx", batchnorm)
        np.savez(folder / f"weights-bn{int(batchnorm)}.npz", **toy.tensors)
    for name, (trainable, optimizer, batchnorm) in TOY_SEGMENTS.items():
        ort_dir = folder / name / "ort"
        generate_segment(folder / f"forward-bn{int(batchnorm)}.onnx", trainable, ort_dir, optimizer=optimizer)
        lower_segment(ort_dir, folder / name / "bundle")
    shutil.copytree(folder / "head_sgd" / "ort", folder / "ort_bundle")
    rng = np.random.default_rng(42)
    centres = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 3]], dtype=np.float32)
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(0, 0.6, (600, 4)).astype(np.float32)
    np.savez(folder / "data.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    return len(TOY_SEGMENTS)


def write_cases(out: Path, forward_of: Callable[[str], ForwardModel] | None = None, cache: Path | None = None) -> Path:
    """Write the whole case directory into ``out`` (created); return it.

    Exports and the artifact cache go to a temporary directory unless given.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_ops(out)
    write_toy(out)
    with tempfile.TemporaryDirectory(prefix="portable-cases-") as scratch:
        exports = forward_of or export_models(Path(scratch) / "exports")
        write_segments(out, exports, cache or Path(scratch) / "artifact-cache")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    args = parser.parse_args()
    write_cases(args.out)


if __name__ == "__main__":
    main()
