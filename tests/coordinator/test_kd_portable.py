"""Knowledge distillation on the portable backend: the lowered KD graphs agree with ORT training (toy MLP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from coordinator.build.lowering import lower_segment  # noqa: E402
from coordinator.build.ort_artifacts import generate_segment  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.portable_trainer import PortableTrainer  # noqa: E402
from edge_agent.trainer import Trainer, TrainSpec  # noqa: E402
from tests.edge_agent.conftest import ToyModel, build_toy_onnx  # noqa: E402

pytestmark = pytest.mark.ort

ALL = ("fc0.weight", "fc0.bias", "head.weight", "head.bias")


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "mlp-bn"])
def kd_bundles(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ToyModel, Path, Path]:
    folder = tmp_path_factory.mktemp("kd-portable")
    toy = build_toy_onnx(folder / "forward.onnx", batchnorm=bool(request.param))
    trainable = ALL + (("bn.weight", "bn.bias") if request.param else ())
    generate_segment(toy.onnx_path, trainable, folder / "ort", optimizer="sgd", kd=True)
    lower_segment(folder / "ort", folder / "portable")
    return toy, folder / "ort", folder / "portable"


def _run(
    make: Callable[[], Trainer], directory: Path, toy: ToyModel, spec: TrainSpec
) -> tuple[float, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    teacher_weights = {  # running stats as they are (a perturbed running_var may turn negative)
        k: v if "running" in k else (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in toy.tensors.items()
    }
    trainer = make()
    trainer.open(directory)
    trainer.set_weights(teacher_weights)
    teacher = trainer.teacher_logits(x, y)  # type: ignore[attr-defined]
    trainer.set_weights(toy.tensors)
    stats = trainer.train(x, y, spec, teacher=teacher)  # type: ignore[call-arg]
    return stats.loss, trainer.get_weights()


def test_one_kd_sgd_step_agrees_with_ort(kd_bundles: tuple[ToyModel, Path, Path]) -> None:
    toy, ort_dir, portable_dir = kd_bundles
    spec = TrainSpec(batch_size=32, lr=0.1, max_steps=1, kd_alpha=0.8, kd_temperature=3.0)
    ort_loss, ort_weights = _run(lambda: OrtTrainer(threads=1), ort_dir, toy, spec)
    portable_loss, portable_weights = _run(lambda: PortableTrainer(threads=1), portable_dir, toy, spec)
    assert abs(ort_loss - portable_loss) < 1e-5
    moved = 0
    for name, value in ort_weights.items():
        np.testing.assert_allclose(portable_weights[name], value, atol=1e-5, rtol=0, err_msg=name)
        moved += int(not np.array_equal(value, toy.tensors[name]))
    assert moved >= len(ALL)


def test_portable_kd_term_vanishes_when_the_student_is_the_teacher(kd_bundles: tuple[ToyModel, Path, Path]) -> None:
    toy, _, portable_dir = kd_bundles
    rng = np.random.default_rng(4)
    x, y = rng.normal(0, 1, (32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    losses = []
    for alpha in (0.0, 1.5):
        trainer = PortableTrainer(threads=1)
        trainer.open(portable_dir)
        trainer.set_weights(toy.tensors)
        losses.append(trainer.train(x, y, TrainSpec(batch_size=32, lr=0.1, max_steps=1, kd_alpha=alpha)).loss)
    if "bn.weight" not in toy.tensors:  # BatchNorm: the teacher (running stats) differs from the student (batch stats)
        assert abs(losses[0] - losses[1]) < 1e-6
