"""PortableTrainer (lowered graphs + numpy optimizer) lands where OrtTrainer lands, on the registry models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from coordinator.build.artifacts import build_segment_artifacts  # noqa: E402
from coordinator.build.portable_artifacts import build_portable_artifacts  # noqa: E402
from coordinator.export import ForwardModel  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.portable_trainer import PortableTrainer  # noqa: E402
from edge_agent.trainer import Trainer, TrainSpec  # noqa: E402
from tests.coordinator.conftest import INPUT_SHAPE, Exported  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

CASES = {  # model: (segment groups, batch size)
    "mlp": (("fc1", "head"), 16),
    "cnn": (("conv0", "fc"), 16),
    "vgg11": (("features.6", "features.7", "classifier.0"), 8),
}
SGD_TOLERANCE = 1e-5
ADAMW_TOLERANCE = 1e-6  # three steps, for all but 1e-4 of the elements (see the test)


def _batch(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *INPUT_SHAPE)).astype(np.float32), rng.integers(0, 10, batch)


def _train(
    trainer: Trainer, directory: Path, forward: ForwardModel, data: tuple[np.ndarray, np.ndarray], spec: TrainSpec
) -> dict[str, np.ndarray]:
    trainer.open(directory)
    trainer.set_weights(forward.tensors)
    trainer.train(*data, spec)
    return trainer.get_weights()


def _both(
    forward: ForwardModel,
    trainable: tuple[str, ...],
    cache: Path,
    optimizer: str,
    data: tuple[np.ndarray, np.ndarray],
    spec: TrainSpec,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ort = build_segment_artifacts(forward, trainable, cache, optimizer=optimizer)
    portable = build_portable_artifacts(forward, trainable, cache, optimizer=optimizer)
    theirs = _train(OrtTrainer(threads=2), ort.directory, forward, data, spec)
    ours = _train(PortableTrainer(threads=2), portable.directory, forward, data, spec)
    return ours, theirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_sgd_step_matches_ort(exported: Callable[[str], Exported], artifact_cache: Path, name: str) -> None:
    forward = exported(name).forward
    groups, batch = CASES[name]
    trainable = forward.params_of(groups)
    ours, theirs = _both(
        forward, trainable, artifact_cache, "sgd", _batch(batch, 7), TrainSpec(batch_size=batch, lr=0.1)
    )
    worst = {n: float(np.abs(ours[n] - theirs[n]).max()) for n in forward.order}
    moved = max(float(np.abs(ours[n] - forward.tensors[n]).max()) for n in trainable)
    assert max(worst.values()) < SGD_TOLERANCE and moved > 1e-4, (
        sorted(worst.items(), key=lambda kv: -kv[1])[:3],
        moved,
    )
    for n in forward.order:
        if n not in trainable and n not in forward.buffers:
            np.testing.assert_array_equal(ours[n], forward.tensors[n], err_msg=n)  # frozen: bit-identical
    for n in forward.buffers:  # every running stat follows the data, as in OrtTrainer
        assert not np.array_equal(ours[n], forward.tensors[n]), n


def test_adamw_steps_match_ort(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("cnn").forward
    trainable = forward.params_of(("conv1", "fc"))
    spec = TrainSpec(epochs=3, batch_size=16, lr=1e-3)
    ours, theirs = _both(forward, trainable, artifact_cache, "adamw", _batch(16, 11), spec)
    diffs = np.concatenate([np.abs(ours[n] - theirs[n]).ravel() for n in forward.order])
    # As in test_parity: Adam turns float noise in gradients near eps (|g| ~ 1e-8) into visible steps, so
    # a handful of elements may differ by up to lr per step; everything else agrees to float precision
    # (measured: 5 of 421,930 elements above 1e-6, at most 1.8e-4; 99.99th percentile 6e-8).
    assert np.count_nonzero(diffs > ADAMW_TOLERANCE) <= 1e-4 * diffs.size, np.sort(diffs)[-10:]
    assert diffs.max() <= 3 * spec.lr


def test_evaluation_matches_ort(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("vgg11").forward
    trainable = forward.params_of(("classifier.2",))
    x, y = _batch(40, 3)
    stats = []
    for trainer, built in (
        (OrtTrainer(threads=2), build_segment_artifacts(forward, trainable, artifact_cache)),
        (PortableTrainer(threads=2), build_portable_artifacts(forward, trainable, artifact_cache)),
    ):
        trainer.open(built.directory)
        trainer.set_weights(forward.tensors)
        stats.append(trainer.evaluate(x, y, batch_size=16))
    assert stats[0].accuracy == stats[1].accuracy and stats[0].samples == stats[1].samples == 40
    assert abs(stats[0].loss - stats[1].loss) < 1e-5, stats


def test_dropout_masks_are_reproducible_and_match_ort(tmp_path: Path) -> None:
    """The lowered DropoutGrad reuses the forward Dropout's mask; masks come from onnxruntime.set_seed(spec.seed)."""
    import torch

    from coordinator.export import export_forward
    from models.vgg import VGG, VGGConfig

    torch.manual_seed(0)
    model = VGG(VGGConfig(layout=(8, "M", 16, "M"), hidden=32, dropout=0.5))
    forward = export_forward(model, INPUT_SHAPE, 10, tmp_path / "export")
    trainable = forward.params_of(("classifier.0", "classifier.1"))
    data = _batch(32, 5)
    spec = TrainSpec(epochs=2, batch_size=8, lr=0.1, seed=3)
    ours, theirs = _both(forward, trainable, tmp_path / "cache", "sgd", data, spec)
    again = _train(
        PortableTrainer(threads=2),
        build_portable_artifacts(forward, trainable, tmp_path / "cache", "sgd").directory,
        forward,
        data,
        spec,
    )
    other = _train(
        PortableTrainer(threads=2),
        build_portable_artifacts(forward, trainable, tmp_path / "cache", "sgd").directory,
        forward,
        data,
        TrainSpec(epochs=2, batch_size=8, lr=0.1, seed=4),
    )
    assert all(np.array_equal(ours[n], again[n]) for n in forward.order)  # same seed: same masks, same result
    assert max(float(np.abs(ours[n] - theirs[n]).max()) for n in forward.order) < SGD_TOLERANCE  # ORT's masks too
    assert max(float(np.abs(ours[n] - other[n]).max()) for n in trainable) > 1e-3  # another seed, other masks
