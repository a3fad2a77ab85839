"""Split learning with the real parts: the cut models, the front's ORT training against torch, the cut
setting, and the agent's bounded wait for a gradient."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import load_trial
from coordinator.errors import ConfigError
from coordinator.plan import GroupInfo
from edge_agent.protocol.messages import HopTask
from edge_agent.trainer import TrainerError, TrainSpec

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.torch]


@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg11"])
def test_front_then_back_is_the_model(name: str) -> None:
    from models import InputSpec, build_model, layer_groups
    from models.split import split_model

    torch.manual_seed(0)
    model = build_model(name, InputSpec()).eval()
    groups = layer_groups(model)
    x = torch.rand(4, 1, 28, 28)
    for cut in (groups[0], groups[-2]):
        front, back = split_model(model, cut)
        torch.testing.assert_close(back(front(x)), model(x))
        assert all(front.owns(n) for n, _ in front.named_parameters() if n.split(".")[0] in front.groups)
    with pytest.raises(ValueError, match="choose one of"):
        split_model(model, groups[-1])


def test_the_cut_is_checked_against_the_model() -> None:
    from coordinator.prepare import split_cut

    groups = tuple(GroupInfo(g, (f"{g}.w",), (), 1) for g in ("conv0", "conv1", "fc", "head"))
    assert split_cut(load_trial(None, {"algorithm": "split"}), groups) == "conv0"  # default: the first group
    assert split_cut(load_trial(None, {"algorithm": "split", "train.split_cut": "fc"}), groups) == "fc"
    for bad in ("head", "conv9"):
        with pytest.raises(ConfigError, match="choose one of: conv0, conv1, fc"):
            split_cut(load_trial(None, {"algorithm": "split", "train.split_cut": bad}), groups)
    with pytest.raises(ConfigError, match="kd_alpha"):
        load_trial(None, {"algorithm": "split", "train.kd_alpha": 1.0})


@pytest.mark.ort
def test_one_front_step_on_the_coordinators_gradient_equals_torch(tmp_path: Path) -> None:
    """Activations out, dL/dA back, SGD step: the ORT front moves exactly like the front of the whole torch
    model trained on the same batch, and its BatchNorm running statistics move once, not twice."""
    from coordinator.build.split_artifacts import generate_front
    from coordinator.export import export_front, model_tensors
    from edge_agent.split_trainer import OrtFrontTrainer
    from models import InputSpec, build_model
    from models.split import split_model

    torch.manual_seed(0)
    model = build_model("cnn", InputSpec()).train()
    front, back = split_model(model, "conv0")
    manifest = generate_front(export_front(model, front, (1, 28, 28), tmp_path), tmp_path / "bundle", optimizer="sgd")
    assert manifest.activation_shape == (32, 14, 14) and set(manifest.trainable) == {
        "conv0.conv.weight", "conv0.bn.weight", "conv0.bn.bias"
    }  # fmt: skip
    before = {n: v for n, v in model_tensors(model).items() if front.owns(n)}
    trainer = OrtFrontTrainer()
    trainer.open(tmp_path / "bundle")
    trainer.set_weights(before)
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 16)
    seen: list[np.ndarray] = []

    def exchange(seq: int, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        a = torch.from_numpy(activations).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(back(a), torch.from_numpy(labels))
        loss.backward()
        seen.append(activations)
        assert a.grad is not None
        return a.grad.numpy(), float(loss.detach())

    stats = trainer.train_split(x, y, TrainSpec(epochs=1, batch_size=16, lr=0.1), exchange)
    assert stats.steps == 1 and 1.5 < stats.loss < 3.5  # cross-entropy of 10 classes near chance
    model.zero_grad()
    logits = model(torch.from_numpy(x))  # the same batch (BatchNorm statistics do not depend on the order)
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    after = trainer.get_weights()
    np.testing.assert_allclose(seen[0].mean(), front(torch.from_numpy(x)).detach().numpy().mean(), rtol=1e-4)
    for name, param in front.named_parameters():
        expected = before[name] - 0.1 * param.grad.numpy()
        np.testing.assert_allclose(after[name], expected, atol=1e-6, err_msg=name)
        assert not np.array_equal(after[name], before[name])
    # running mean after one train-mode pass over the batch: 0.9 * old + 0.1 * batch mean (torch ran it twice)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(before["conv0.conv.weight"]), padding=1)
    batch_mean = conv.mean(dim=(0, 2, 3)).numpy()
    expected_mean = 0.9 * before["conv0.bn.running_mean"] + 0.1 * batch_mean
    np.testing.assert_allclose(after["conv0.bn.running_mean"], expected_mean, atol=1e-5)


def test_a_gradient_that_never_comes_fails_the_hop_in_bounded_time() -> None:
    from edge_agent.actions import Gradient
    from edge_agent.hop import GradientChannel

    channel = GradientChannel()  # the worker's side of a split hop: no broker, no data
    task = HopTask(0, 4, 0, ["conv0"], [], "sha", 1, "coordinator", "coordinator", 1, 8, 0.1, 0, split=True,
                   gradient_timeout_s=0.3)  # fmt: skip
    exchange = channel.exchange_for(task, "none")
    channel.deliver(Gradient(3, 0, np.zeros(1), 1.0))  # a stale answer for another hop is skipped
    started = time.monotonic()
    with pytest.raises(TrainerError, match="no gradient for batch 0 of hop 4 from the coordinator within 0.3 s"):
        exchange(0, np.zeros((1, 2), np.float32), np.array([1]))
    assert 0.25 < time.monotonic() - started < 2.0
    assert [(hop, seq) for hop, seq, _ in channel.outgoing()] == [(4, 0)]  # the batch went out to the loop
    exchange = channel.exchange_for(dataclasses.replace(task, gradient_timeout_s=5.0), "none")
    channel.deliver(Gradient(4, 1, np.ones(2), 0.5))
    grad, loss = exchange(1, np.zeros((1, 2), np.float32), np.array([1]))
    assert loss == 0.5 and grad.tolist() == [1.0, 1.0]
    channel.stop()  # the agent is closing: the worker stops at once
    with pytest.raises(TrainerError, match="stopping"):
        exchange(2, np.zeros((1, 2), np.float32), np.array([1]))
