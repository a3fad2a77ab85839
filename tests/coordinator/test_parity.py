"""One SGD step in ONNX Runtime equals one SGD step in torch (same weights, batch and segment)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from coordinator.build.artifacts import build_segment_artifacts  # noqa: E402
from coordinator.export import ForwardModel, load_tensors, model_tensors  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.trainer import TrainSpec  # noqa: E402
from tests.coordinator.conftest import INPUT_SHAPE, Exported  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

LR = 0.1
CASES = {  # model: (segment groups, batch size)
    "mlp": (("fc1", "head"), 16),
    "cnn": (("conv1", "fc"), 16),
    "vgg11": (("features.6", "features.7", "classifier.0"), 8),
}


def _torch_sgd_step(
    model: torch.nn.Module, tensors: dict[str, np.ndarray], trainable: tuple[str, ...], x: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    twin = copy.deepcopy(model)
    load_tensors(twin, tensors)
    twin.train()
    params = [p for n, p in twin.named_parameters() if n in trainable]
    for name, param in twin.named_parameters():
        param.requires_grad_(name in trainable)
    optimizer = torch.optim.SGD(params, lr=LR)
    loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    optimizer.step()
    return model_tensors(twin)


def _ort_sgd_step(
    forward: ForwardModel, cache: Path, trainable: tuple[str, ...], x: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    built = build_segment_artifacts(forward, trainable, cache, optimizer="sgd")
    trainer = OrtTrainer(threads=2)
    trainer.open(built.directory)
    trainer.set_weights(forward.tensors)
    stats = trainer.train(x, y, TrainSpec(epochs=1, batch_size=len(x), lr=LR, seed=0))
    assert stats.steps == 1
    return trainer.get_weights()


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_sgd_step_matches_torch(exported: Callable[[str], Exported], artifact_cache: Path, name: str) -> None:
    item = exported(name)
    groups, batch = CASES[name]
    forward = item.forward
    trainable = forward.params_of(groups)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    ours = _ort_sgd_step(forward, artifact_cache, trainable, x, y)
    theirs = _torch_sgd_step(item.model, forward.tensors, trainable, x, y)
    worst = max(float(np.abs(ours[n] - theirs[n]).max()) for n in trainable)
    moved = max(float(np.abs(ours[n] - forward.tensors[n]).max()) for n in trainable)  # the step did something
    print(f"{name}: max |ORT - torch| over trainable params {worst:.3g}, largest update {moved:.3g}")
    assert worst < 1e-5 and moved > 1e-4, (worst, moved)
    for n in forward.order:
        if n in trainable:
            continue
        if n in forward.buffers:
            continue  # running statistics (every BN layer is in training mode): compared below
        np.testing.assert_array_equal(ours[n], forward.tensors[n], err_msg=n)  # frozen: bit-identical
    for n in forward.buffers:
        if n.endswith("running_mean"):
            np.testing.assert_allclose(ours[n], theirs[n], atol=1e-5, rtol=0, err_msg=n)
        else:  # ORT updates running_var with the biased batch variance, torch with the unbiased one
            unbiased = batch / (batch - 1)
            np.testing.assert_allclose(ours[n], theirs[n], atol=0.1 * (unbiased - 1) + 1e-5, rtol=0, err_msg=n)


def test_adamw_steps_match_torch_adamw(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    """Three full-batch AdamW steps (torch defaults: eps 1e-8, weight decay 0.01, torch's update rule)."""
    item = exported("cnn")
    forward = item.forward
    trainable = forward.params_of(("conv1", "fc"))
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    built = build_segment_artifacts(forward, trainable, artifact_cache, optimizer="adamw")
    trainer = OrtTrainer(threads=2)
    trainer.open(built.directory)
    trainer.set_weights(forward.tensors)
    assert trainer.train(x, y, TrainSpec(epochs=3, batch_size=16, lr=1e-3)).steps == 3
    ours = trainer.get_weights()
    twin = copy.deepcopy(item.model)
    load_tensors(twin, forward.tensors)
    twin.train()
    for name, param in twin.named_parameters():
        param.requires_grad_(name in trainable)
    optimizer = torch.optim.AdamW([p for n, p in twin.named_parameters() if n in trainable], lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    theirs = model_tensors(twin)
    diffs = np.concatenate([np.abs(ours[n] - theirs[n]).ravel() for n in trainable])
    # Adam turns float noise in gradients near eps (|g| ~ 1e-8) into visible steps: a handful of
    # elements may differ by up to lr per step; everything else agrees to float precision.
    assert np.count_nonzero(diffs > 1e-6) <= 1e-4 * diffs.size, np.sort(diffs)[-10:]
    assert diffs.max() <= 3 * 1e-3
