"""PortableTrainer on plain onnxruntime lands where OrtTrainer landed (recorded in the main environment)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.portable_trainer import PortableTrainer
from edge_agent.trainer import TrainSpec
from tests.portable.layout import ADAMW_MIN_OUTLIERS, ADAMW_TOLERANCE, SEGMENT_CASES, SGD_TOLERANCE

pytestmark = pytest.mark.portable


@pytest.mark.parametrize("name", sorted(SEGMENT_CASES))
def test_training_matches_ort(portable_cases: Path, name: str) -> None:
    folder = portable_cases / "segments" / name
    weights = dict(np.load(folder / "weights.npz"))
    data = np.load(folder / "data.npz")
    expected = dict(np.load(folder / "expected.npz"))
    spec_json = json.loads((folder / "spec.json").read_text())
    trainer = PortableTrainer(threads=2)
    trainer.open(folder / "bundle")
    trainer.set_weights(weights)
    spec = TrainSpec(epochs=spec_json["epochs"], batch_size=spec_json["batch_size"], lr=spec_json["lr"], seed=3)
    stats = trainer.train(data["x"], data["y"], spec)
    after = trainer.get_weights()
    evaluation = trainer.evaluate(data["x"], data["y"])
    assert stats.steps == spec_json["steps"]
    changed = [n for n in expected if not n.startswith("stats:")]
    for n in weights:
        if n not in changed:
            np.testing.assert_array_equal(after[n], weights[n], err_msg=n)  # frozen: bit-identical
    diffs = np.concatenate([np.abs(after[n] - expected[n]).ravel() for n in changed])
    if SEGMENT_CASES[name][4] == "adamw":
        outliers = max(1e-4 * diffs.size, ADAMW_MIN_OUTLIERS)
        assert np.count_nonzero(diffs > ADAMW_TOLERANCE) <= outliers, np.sort(diffs)[-5:]
        assert diffs.max() <= 3 * spec.lr
    else:
        assert diffs.max() < SGD_TOLERANCE, diffs.max()
    assert abs(stats.loss - float(expected["stats:train_loss"])) < 1e-5
    assert abs(evaluation.loss - float(expected["stats:eval_loss"])) < 1e-4
    assert evaluation.accuracy == pytest.approx(float(expected["stats:eval_accuracy"]))
