"""Knowledge distillation in the ONNX Runtime training graph, on the toy MLP. No torch, no coordinator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from coordinator.build.ort_artifacts import generate_segment  # noqa: E402
from edge_agent import distill  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer, TrainerError  # noqa: E402
from edge_agent.trainer import TrainSpec  # noqa: E402
from tests.edge_agent.conftest import ToyModel  # noqa: E402

pytestmark = pytest.mark.ort

ALL = ("fc0.weight", "fc0.bias", "head.weight", "head.bias")
Data = tuple[np.ndarray, np.ndarray]


def kd_loss_numpy(student: np.ndarray, teacher: np.ndarray, y: np.ndarray, alpha: float, t: float) -> float:
    """CE(student, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch means, float64."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    s, te = student.astype(np.float64), teacher.astype(np.float64)
    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    log_t, log_s = log_softmax(te / t), log_softmax(s / t)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=1).mean()
    return float(ce + alpha * t * t * kl)


@pytest.fixture(scope="module")
def kd_segment(tmp_path_factory: pytest.TempPathFactory, toy: Callable[..., ToyModel]) -> Path:
    out = tmp_path_factory.mktemp("kd-segment")
    generate_segment(toy().onnx_path, ALL, out, optimizer="sgd", kd=True)
    return out


def _trainer(directory: Path, tensors: dict[str, np.ndarray]) -> OrtTrainer:
    trainer = OrtTrainer(threads=1)
    trainer.open(directory)
    trainer.set_weights(tensors)
    return trainer


def _other_weights(tensors: dict[str, np.ndarray], seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in tensors.items()}


def _first_loss(trainer: OrtTrainer, data: Data, spec: TrainSpec, teacher: np.ndarray | None = None) -> float:
    losses: list[float] = []
    trainer.train(*data, spec, on_step=lambda _s, _t, loss: losses.append(loss), teacher=teacher)
    return losses[0]


def test_one_kd_step_loss_is_ce_plus_scaled_kl(kd_segment: Path, toy: Callable[..., ToyModel], blobs: Data) -> None:
    x, y = blobs[0][:64], blobs[1][:64]
    trainer = _trainer(kd_segment, _other_weights(toy().tensors))
    teacher = trainer.teacher_logits(x, y)  # a teacher that differs from the student
    trainer.set_weights(toy().tensors)
    student = trainer.teacher_logits(x, y)  # the student's logits before the step (eval graph)
    alpha, t = 0.7, 2.5
    spec = TrainSpec(batch_size=64, lr=0.1, max_steps=1, kd_alpha=alpha, kd_temperature=t)
    loss = _first_loss(trainer, (x, y), spec, teacher)  # one full batch: the mean ignores the shuffle
    expected = kd_loss_numpy(student, teacher, y, alpha, t)
    assert abs(loss - expected) < 1e-5
    assert abs(loss - kd_loss_numpy(student, teacher, y, 0.0, t)) > 0.05  # the KD term is really there


def test_kd_term_vanishes_when_the_student_is_the_teacher(
    kd_segment: Path, segment: Callable[..., Path], toy: Callable[..., ToyModel], blobs: Data
) -> None:
    x, y = blobs[0][:64], blobs[1][:64]
    spec = TrainSpec(batch_size=64, lr=0.1, max_steps=1, kd_alpha=1.0, kd_temperature=2.0)
    kd_loss = _first_loss(_trainer(kd_segment, toy().tensors), (x, y), spec)  # teacher: the received weights
    plain = _first_loss(
        _trainer(segment(ALL, "sgd"), toy().tensors), (x, y), TrainSpec(batch_size=64, lr=0.1, max_steps=1)
    )
    assert abs(kd_loss - plain) < 1e-6


def test_alpha_zero_on_a_kd_bundle_trains_like_the_plain_bundle(
    kd_segment: Path, segment: Callable[..., Path], toy: Callable[..., ToyModel], blobs: Data
) -> None:
    spec = TrainSpec(batch_size=50, lr=0.1, max_steps=4)
    kd, plain = _trainer(kd_segment, toy().tensors), _trainer(segment(ALL, "sgd"), toy().tensors)
    kd.train(*blobs, spec)
    plain.train(*blobs, spec)
    for name, value in plain.get_weights().items():
        np.testing.assert_allclose(kd.get_weights()[name], value, atol=1e-6)
    assert abs(kd.evaluate(*blobs).loss - plain.evaluate(*blobs).loss) < 1e-6


def test_kd_changes_training_and_bad_settings_are_refused(
    kd_segment: Path, segment: Callable[..., Path], toy: Callable[..., ToyModel], blobs: Data
) -> None:
    teacher = _trainer(kd_segment, _other_weights(toy().tensors)).teacher_logits(*blobs)
    runs = {}
    for alpha in (0.0, 2.0):
        trainer = _trainer(kd_segment, toy().tensors)
        trainer.train(*blobs, TrainSpec(batch_size=50, lr=0.1, max_steps=3, kd_alpha=alpha), teacher=teacher)
        runs[alpha] = trainer.get_weights()["head.weight"]
    assert not np.allclose(runs[0.0], runs[2.0])
    with pytest.raises(TrainerError, match="knowledge-distillation bundle"):
        _trainer(segment(ALL, "sgd"), toy().tensors).train(*blobs, TrainSpec(kd_alpha=0.5))
    for bad in (TrainSpec(kd_alpha=-1.0), TrainSpec(kd_alpha=1.0, kd_temperature=0.0)):
        with pytest.raises(TrainerError, match="kd_"):
            _trainer(kd_segment, toy().tensors).train(*blobs, bad)


def test_the_teacher_pass_runs_in_training_sized_batches(
    kd_segment: Path, toy: Callable[..., ToyModel], blobs: Data
) -> None:
    seen: list[int] = []

    def logits_of(xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
        seen.append(len(xb))
        return np.zeros((len(xb), 3), np.float32)

    assert distill.teacher_logits(logits_of, np.zeros((100, 2)), np.zeros(100), 16).shape == (100, 3)
    assert max(seen) <= 16 and sum(seen) == 100  # a 256-row teacher pass was a KD hop's memory peak
    x, y = blobs[0][:100], blobs[1][:100]
    trainer = _trainer(kd_segment, toy().tensors)
    # BatchNorm in inference mode: the batch size does not change the logits
    np.testing.assert_allclose(trainer.teacher_logits(x, y, 16), trainer.teacher_logits(x, y), rtol=1e-5, atol=1e-6)
