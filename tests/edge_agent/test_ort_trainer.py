"""OrtTrainer on a toy MLP built with onnx.helper; artifacts generated here, as on a device. No torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edge_agent.ort_trainer import OrtTrainer, TrainerError  # noqa: E402
from edge_agent.trainer import TrainSpec  # noqa: E402
from tests.edge_agent.conftest import ToyModel  # noqa: E402

pytestmark = pytest.mark.ort

ALL = ("fc0.weight", "fc0.bias", "head.weight", "head.bias")
HEAD = ("head.weight", "head.bias")
Data = tuple[np.ndarray, np.ndarray]


def _trainer(directory: Path, tensors: dict[str, np.ndarray]) -> OrtTrainer:
    trainer = OrtTrainer(threads=1)
    trainer.open(directory)
    trainer.set_weights(tensors)
    return trainer


def test_training_learns_a_separable_problem(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data
) -> None:
    x, y = blobs
    trainer = _trainer(segment(ALL), toy().tensors)
    before = trainer.evaluate(x, y, batch_size=128)
    steps: list[tuple[int, int, float]] = []
    stats = trainer.train(x, y, TrainSpec(epochs=5, batch_size=32, lr=0.01), on_step=lambda *a: steps.append(a))
    after = trainer.evaluate(x, y, batch_size=128)
    assert after.loss < 0.5 * before.loss and after.accuracy > 0.95
    assert stats.steps == 5 * (600 // 32) == len(steps) and stats.samples == stats.steps * 32
    assert [s[0] for s in steps] == list(range(1, stats.steps + 1)) and {s[1] for s in steps} == {stats.steps}
    assert np.isclose(stats.loss, np.mean([s[2] for s in steps[-(600 // 32) :]]))


def test_frozen_parameters_stay_bit_identical(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data
) -> None:
    x, y = blobs
    tensors = toy().tensors
    trainer = _trainer(segment(HEAD, "sgd"), tensors)
    trainer.train(x, y, TrainSpec(epochs=1, batch_size=50, lr=0.1))
    weights = trainer.get_weights()
    for name in ("fc0.weight", "fc0.bias"):
        np.testing.assert_array_equal(weights[name], tensors[name])
    assert not np.array_equal(weights["head.weight"], tensors["head.weight"])


def test_running_stats_follow_the_data_inside_and_outside_the_segment(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data
) -> None:
    x, y = blobs
    tensors = toy(True).tensors
    spec = TrainSpec(epochs=1, batch_size=64, lr=0.05)
    outside = _trainer(segment(HEAD, batchnorm=True), tensors)
    outside.train(x, y, spec)
    inside = _trainer(segment(("bn.weight", "bn.bias"), batchnorm=True), tensors)
    inside.train(x, y, spec)
    for name in ("bn.running_mean", "bn.running_var"):  # statistics, not parameters: BN ran in training mode
        np.testing.assert_array_equal(outside.get_weights()[name], inside.get_weights()[name])
        assert not np.allclose(outside.get_weights()[name], tensors[name])
    np.testing.assert_array_equal(outside.get_weights()["bn.weight"], tensors["bn.weight"])  # a frozen parameter


def test_weights_round_trip_as_float32_copies(toy: Callable[..., ToyModel], segment: Callable[..., Path]) -> None:
    tensors = toy(True).tensors
    trainer = _trainer(segment(HEAD, batchnorm=True), {k: v.astype(np.float64) for k, v in tensors.items()})
    weights = trainer.get_weights()
    assert list(weights) == list(tensors)  # manifest order = forward initializer order
    for name, value in tensors.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], value)
    weights["head.bias"][:] = 99.0
    assert not np.any(trainer.get_weights()["head.bias"] == 99.0)


class _OneAtATime(Mapping[str, np.ndarray]):
    """Weights produced on access (as if read from disk), each checked dead before the next is made."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors, self.taken = tensors, list[str]()
        self.alive: list[weakref.ref[np.ndarray]] = []

    def __getitem__(self, name: str) -> np.ndarray:
        assert all(ref() is None for ref in self.alive), "the trainer kept an earlier tensor"
        self.taken.append(name)
        value = self.tensors[name].copy()
        self.alive.append(weakref.ref(value))
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def test_weights_load_one_tensor_at_a_time_without_a_second_copy_of_the_model(
    toy: Callable[..., ToyModel], segment: Callable[..., Path]
) -> None:
    """Loading holds ONNX Runtime's copy plus one tensor, never the whole model again (OPT-1.3B: 5 GB)."""
    tensors = toy(True).tensors
    lazy = _OneAtATime(tensors)
    trainer = _trainer(segment(HEAD, batchnorm=True), lazy)
    assert lazy.taken == list(tensors)  # each read once, in the manifest's order
    for name, value in trainer.get_weights().items():
        np.testing.assert_array_equal(value, tensors[name])


def test_a_runtime_whose_parameters_are_copies_is_refused_not_loaded_with_zeros(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading writes through ``state.parameters[name].data``; were that a copy (another onnxruntime build),
    the model would silently train from zeros. The trainer checks the first tensor and says why."""
    from edge_agent.ort_training import training_module  # the torch-free import, as the agent's

    checkpoint_state = training_module("api.checkpoint_state")
    real = checkpoint_state.Parameter.data
    monkeypatch.setattr(checkpoint_state.Parameter, "data", property(lambda self: real.fget(self).copy()))
    with pytest.raises(TrainerError, match="copies of parameters, not views"):
        _trainer(segment(HEAD), toy().tensors)


def test_same_weights_data_and_seed_give_the_same_result(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data
) -> None:
    x, y = blobs
    spec = TrainSpec(epochs=1, batch_size=32, lr=0.01, seed=5)
    trainer = _trainer(segment(ALL), toy().tensors)
    trainer.train(x, y, spec)
    first = trainer.get_weights()
    trainer.set_weights(toy().tensors)  # fresh optimizer state too (AdamW moments)
    trainer.train(x, y, spec)
    for name, value in trainer.get_weights().items():
        np.testing.assert_array_equal(value, first[name])


def test_evaluate_and_small_batches(toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data) -> None:
    x, y = blobs
    trainer = _trainer(segment(HEAD, batchnorm=True), toy(True).tensors)
    stats = trainer.evaluate(x[:7], y[:7], batch_size=3)
    assert 0.0 <= stats.accuracy <= 1.0 and stats.samples == 7 and np.isfinite(stats.loss)
    assert trainer.train(x[:65], y[:65], TrainSpec(batch_size=64)).steps == 1  # last partial batch dropped
    assert trainer.train(x[:5], y[:5], TrainSpec(batch_size=64)).samples == 5  # fewer than a batch: one batch
    assert trainer.train(x[:9], y[:9], TrainSpec(batch_size=4, max_steps=1, epochs=3)).steps == 1


def test_clear_errors(toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data, tmp_path: Path) -> None:
    x, y = blobs
    tensors = toy().tensors
    trainer = OrtTrainer()
    with pytest.raises(TrainerError, match="lacks"):
        trainer.open(tmp_path)
    with pytest.raises(TrainerError, match="open"):
        trainer.set_weights(tensors)
    trainer.open(segment(HEAD))
    with pytest.raises(TrainerError, match="set_weights"):
        trainer.evaluate(x, y)
    with pytest.raises(TrainerError, match="missing.*fc0.bias"):
        trainer.set_weights({k: v for k, v in tensors.items() if k != "fc0.bias"})
    with pytest.raises(TrainerError, match=r"'head.weight' has shape \(3, 15\)"):
        trainer.set_weights({**tensors, "head.weight": np.zeros((3, 15), np.float32)})
    with pytest.raises(TrainerError, match="unknown"):
        trainer.set_weights({**tensors, "extra": np.zeros(1, np.float32)})
    trainer.set_weights(tensors)
    with pytest.raises(TrainerError, match="inputs have shape"):
        trainer.evaluate(x[:, :3], y)
    with pytest.raises(TrainerError, match="labels"):
        trainer.train(x, y + 3, TrainSpec())


def test_broken_manifest_is_a_trainer_error(segment: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(segment(HEAD), broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(TrainerError, match="format"):
        OrtTrainer().open(broken)


def test_corrupt_graph_is_a_trainer_error(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(segment(HEAD), broken)
    (broken / "training_model.onnx").write_bytes(b"not an onnx model")
    trainer = OrtTrainer()
    trainer.open(broken)
    with pytest.raises(TrainerError, match="cannot load artifacts"):
        trainer.set_weights(toy().tensors)
    with pytest.raises(TrainerError, match="set_weights"):
        trainer.get_weights()


_FRESH_INTERPRETER = """
import sys
import numpy as np
import edge_agent.ort_trainer
import coordinator.build.ort_artifacts
from edge_agent.ort_trainer import OrtTrainer
from edge_agent.trainer import TrainSpec
assert "torch" not in sys.modules, "importing the modules loaded torch"
generated = coordinator.build.ort_artifacts.generate_segment(sys.argv[1], ["head.weight", "head.bias"], sys.argv[2])
trainer = OrtTrainer(threads=1)
trainer.open(sys.argv[2])
trainer.set_weights({n: np.zeros(s, np.float32) for n, s in generated.shapes.items()})
trainer.train(np.ones((8, 4), np.float32), np.zeros(8, np.int64), TrainSpec(batch_size=4))
assert "torch" not in sys.modules, "training loaded torch"
print("torch-free")
"""


def test_the_ort_backend_never_imports_torch(toy: Callable[..., ToyModel], tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FRESH_INTERPRETER), str(toy().onnx_path), str(tmp_path / "seg")],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch-free"


def test_release_weights_hands_over_the_trained_weights_and_frees_the_session(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], blobs: Data
) -> None:
    x, y = blobs
    trainer = _trainer(segment(ALL), toy().tensors)
    trainer.train(x, y, TrainSpec(epochs=1, batch_size=32, lr=0.01, seed=5))
    expected = trainer.get_weights()
    released = trainer.release_weights()
    assert list(released) == list(expected) and all(np.array_equal(released[n], expected[n]) for n in expected)
    with pytest.raises(TrainerError, match="no weights loaded"):
        trainer.get_weights()
    assert all(v.dtype == np.float32 and v.shape == expected[n].shape for n, v in released.items())
    trainer.set_weights(released)  # usable again once weights are loaded
    assert all(np.array_equal(v, expected[n]) for n, v in trainer.get_weights().items())
    trainer.set_weights(toy().tensors)  # the released arrays are ONNX Runtime's tensors, kept alive by them:
    trainer.train(x, y, TrainSpec(epochs=2, batch_size=32, lr=0.01, seed=6))  # new sessions never reuse them
    del trainer
    assert all(np.array_equal(released[n], expected[n]) for n in expected)
