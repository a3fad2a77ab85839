"""Label-skew methods in the hop, on the toy MLP with real ONNX Runtime training: logit adjustment and the
FedProx proximal term change training when switched on and leave it bit-identical when off; BatchNorm
statistics mixing (numpy) mixes moments and leaves the trained groups' own statistics alone."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.bnstats import mix_running_stats, mixed_buffers
from edge_agent.distill import label_log_prior
from edge_agent.protocol.manifest import SegmentManifest
from tests.edge_agent.conftest import ToyModel

ALL = ("fc0.weight", "fc0.bias", "head.weight", "head.bias")
Data = tuple[np.ndarray, np.ndarray]


def test_label_log_prior_counts_every_class_once_more() -> None:
    prior = label_log_prior(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(np.exp(prior), [4 / 7, 2 / 7, 1 / 7], rtol=1e-6)


def test_mixing_running_stats_mixes_moments_and_is_off_at_zero() -> None:
    received = {"bn.running_mean": np.array([0.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
    trained = {"bn.running_mean": np.array([2.0], np.float32), "bn.running_var": np.array([1.0], np.float32)}
    same = mix_running_stats(received, dict(trained), list(trained), 0.0)
    assert all(np.array_equal(same[k], trained[k]) for k in trained)
    mixed = mix_running_stats(received, dict(trained), list(trained), 0.5)
    assert mixed["bn.running_mean"][0] == pytest.approx(1.0)
    assert mixed["bn.running_var"][0] == pytest.approx(2.0)  # within-variance 1 + spread of the means 1


def test_a_hop_mixes_only_the_statistics_of_groups_it_did_not_train() -> None:
    names = ("a.w", "a.running_mean", "a.running_var", "b.w", "b.running_mean", "b.running_var")
    manifest = SegmentManifest(
        "x", "labels", "logits", "loss", names, dict.fromkeys(names, (1,)), ("b.w",),
        tuple(n for n in names if "running" in n), ("b.running_mean", "b.running_var"), "sgd", 2, (1,),
    )  # fmt: skip
    assert mixed_buffers(manifest) == ["a.running_mean", "a.running_var"]


@pytest.mark.ort
@pytest.mark.parametrize("method", ["logit_adjust", "prox_mu"])
def test_a_method_changes_training_when_on_and_not_when_off(
    method: str, tmp_path_factory: pytest.TempPathFactory, toy: Callable[..., ToyModel], blobs: Data
) -> None:
    from coordinator.build.ort_artifacts import generate_segment
    from edge_agent.ort_trainer import OrtTrainer
    from edge_agent.trainer import TrainSpec

    directory = tmp_path_factory.mktemp("skew-segment")
    generate_segment(toy().onnx_path, ALL, directory, optimizer="sgd", kd=True)
    keep = blobs[1] != 2  # a skewed hop: class 2 absent
    x, y = blobs[0][keep], blobs[1][keep]

    def train(**spec: float) -> dict[str, np.ndarray]:
        trainer = OrtTrainer(threads=1)
        trainer.open(directory)
        trainer.set_weights(toy().tensors)
        trainer.train(x, y, TrainSpec(batch_size=32, lr=0.1, max_steps=6, **spec))  # type: ignore[arg-type]
        return trainer.get_weights()

    plain, off, on = train(), train(**{method: 0.0}), train(**{method: 1.0})
    assert all(np.array_equal(plain[k], off[k]) for k in plain)
    assert not np.allclose(plain["head.bias"], on["head.bias"])
    start = toy().tensors
    if method == "logit_adjust":  # the absent class is pushed down less
        assert on["head.bias"][2] > plain["head.bias"][2]
    else:  # the proximal term keeps the weights nearer their start
        assert sum(np.abs(on[n] - start[n]).sum() for n in ALL) < sum(np.abs(plain[n] - start[n]).sum() for n in ALL)
