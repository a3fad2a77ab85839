"""PortableTrainer behaviour on toy-model bundles (the OrtTrainer tests' counterparts), and backend selection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edge_agent.backends import installed, make_trainer
from edge_agent.portable_trainer import PortableTrainer
from edge_agent.trainer import TrainerError, TrainSpec

pytestmark = pytest.mark.portable

Data = tuple[np.ndarray, np.ndarray]


@pytest.fixture
def toy(portable_cases: Path) -> Path:
    return portable_cases / "toy"


@pytest.fixture
def blobs(toy: Path) -> Data:
    data = np.load(toy / "data.npz")
    return data["x"], data["y"]


def _weights(toy: Path, batchnorm: bool = False) -> dict[str, np.ndarray]:
    return dict(np.load(toy / f"weights-bn{int(batchnorm)}.npz"))


def _trainer(toy: Path, segment: str, batchnorm: bool = False) -> PortableTrainer:
    trainer = PortableTrainer(threads=1)
    trainer.open(toy / segment / "bundle")
    trainer.set_weights(_weights(toy, batchnorm))
    return trainer


def test_training_learns_a_separable_problem(toy: Path, blobs: Data) -> None:
    x, y = blobs
    trainer = _trainer(toy, "all_adamw")
    before = trainer.evaluate(x, y, batch_size=128)
    steps: list[tuple[int, int, float]] = []
    stats = trainer.train(x, y, TrainSpec(epochs=5, batch_size=32, lr=0.01), on_step=lambda *a: steps.append(a))
    after = trainer.evaluate(x, y, batch_size=128)
    assert after.loss < 0.5 * before.loss and after.accuracy > 0.95
    assert stats.steps == 5 * (600 // 32) == len(steps) and stats.samples == stats.steps * 32
    assert [s[0] for s in steps] == list(range(1, stats.steps + 1)) and {s[1] for s in steps} == {stats.steps}
    assert np.isclose(stats.loss, np.mean([s[2] for s in steps[-(600 // 32) :]]))


def test_frozen_parameters_stay_bit_identical(toy: Path, blobs: Data) -> None:
    tensors = _weights(toy)
    trainer = _trainer(toy, "head_sgd")
    trainer.train(*blobs, TrainSpec(epochs=1, batch_size=50, lr=0.1))
    weights = trainer.get_weights()
    for name in ("fc0.weight", "fc0.bias"):
        np.testing.assert_array_equal(weights[name], tensors[name])
    assert not np.array_equal(weights["head.weight"], tensors["head.weight"])


def test_running_stats_follow_the_data_inside_and_outside_the_segment(toy: Path, blobs: Data) -> None:
    tensors = _weights(toy, batchnorm=True)
    spec = TrainSpec(epochs=1, batch_size=64, lr=0.05)
    outside = _trainer(toy, "head_bn", batchnorm=True)
    outside.train(*blobs, spec)
    inside = _trainer(toy, "bn_only", batchnorm=True)
    inside.train(*blobs, spec)
    for name in ("bn.running_mean", "bn.running_var"):  # statistics, not parameters: BN ran in training mode
        np.testing.assert_array_equal(outside.get_weights()[name], inside.get_weights()[name])
        assert not np.allclose(outside.get_weights()[name], tensors[name])
    np.testing.assert_array_equal(outside.get_weights()["bn.weight"], tensors["bn.weight"])  # a frozen parameter


def test_results_depend_only_on_weights_data_and_spec(toy: Path, blobs: Data) -> None:
    spec = TrainSpec(epochs=2, batch_size=40, lr=0.01, seed=5)
    trainer = _trainer(toy, "all_adamw")
    trainer.train(*blobs, spec)
    first = trainer.get_weights()
    trainer.set_weights(_weights(toy))  # a fresh optimizer, as OrtTrainer's fresh session
    trainer.train(*blobs, spec)
    assert all(np.array_equal(first[n], v) for n, v in trainer.get_weights().items())


def test_weights_round_trip_as_float32_copies(toy: Path) -> None:
    tensors = {name: value.astype(np.float64) for name, value in _weights(toy).items()}
    trainer = PortableTrainer()
    trainer.open(toy / "head_sgd" / "bundle")
    trainer.set_weights(tensors)
    out = trainer.get_weights()
    assert all(out[n].dtype == np.float32 and np.array_equal(out[n], tensors[n]) for n in tensors)
    out["head.bias"][:] = 99.0
    tensors["head.weight"][:] = 99.0
    assert not np.any(trainer.get_weights()["head.bias"] == 99.0)
    assert not np.any(trainer.get_weights()["head.weight"] == 99.0)


def test_misuse_is_refused_with_trainer_errors(toy: Path, blobs: Data) -> None:
    x, y = blobs
    trainer = PortableTrainer()
    with pytest.raises(TrainerError, match="open"):
        trainer.get_weights()
    with pytest.raises(TrainerError, match="portable bundle"):
        trainer.open(toy / "ort_bundle")
    with pytest.raises(TrainerError, match="manifest"):
        trainer.open(toy)
    trainer.open(toy / "head_sgd" / "bundle")
    with pytest.raises(TrainerError, match="no weights"):
        trainer.train(x, y, TrainSpec())
    with pytest.raises(TrainerError, match="missing"):
        trainer.set_weights({"fc0.weight": np.zeros((16, 4), np.float32)})
    bad = _weights(toy) | {"head.bias": np.zeros(4, np.float32)}
    with pytest.raises(TrainerError, match="shape"):
        trainer.set_weights(bad)
    trainer.set_weights(_weights(toy))
    with pytest.raises(TrainerError, match="labels"):
        trainer.train(x, y + 3, TrainSpec())
    with pytest.raises(TrainerError, match="inputs"):
        trainer.evaluate(x[:, :3], y)
    with pytest.raises(TrainerError, match="spec"):
        trainer.train(x, y, TrainSpec(batch_size=0))


def test_max_steps_and_small_data(toy: Path, blobs: Data) -> None:
    x, y = blobs
    trainer = _trainer(toy, "head_sgd")
    assert trainer.train(x, y, TrainSpec(epochs=3, batch_size=50, max_steps=4)).steps == 4
    assert trainer.train(x[:10], y[:10], TrainSpec(batch_size=64)).samples == 10  # one batch of all ten


def test_installed_backends_and_auto_choice() -> None:
    """Plain onnxruntime: only "portable"; the training build: "ort" first, "portable" too."""
    spec = importlib.util.find_spec("onnxruntime")
    assert spec is not None and spec.submodule_search_locations
    training = (Path(next(iter(spec.submodule_search_locations))) / "training" / "api").is_dir()
    assert installed() == (["ort", "portable"] if training else ["portable"])
    assert make_trainer("auto").backend == installed()[0]
    assert make_trainer("portable", threads=1).backend == "portable"


def test_release_weights_hands_over_the_trained_weights(toy: Path, blobs: Data) -> None:
    trainer = _trainer(toy, "all_adamw")
    trainer.train(*blobs, TrainSpec(epochs=1, batch_size=40, lr=0.01, seed=5))
    expected = trainer.get_weights()
    released = trainer.release_weights()
    assert list(released) == list(expected) and all(np.array_equal(released[n], expected[n]) for n in expected)
    with pytest.raises(TrainerError):
        trainer.get_weights()
