"""Every lowered operator against ORT's own training kernel, on random inputs, in one process.

The cases (shapes, attributes, edge cases) are in lowering_cases*.py; plain onnxruntime
reruns the same lowered graphs in tests/portable (see portable_cases.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from coordinator.lowering import RULES  # noqa: E402
from tests.coordinator.lowering_cases import OpCase, all_cases, lowered_model, original_model, run  # noqa: E402

pytestmark = pytest.mark.ort

CASES = all_cases()


@pytest.fixture(autouse=True, scope="module")
def _training_kernels() -> None:
    from edge_agent.ort_training import OrtUnavailableError, training_module

    try:
        training_module("api")  # the training kernels come with the training build
    except OrtUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_lowered_operator_matches_the_training_kernel(case: OpCase) -> None:
    expected = run(original_model(case), case)
    actual = run(lowered_model(case, expected), case)
    for (name, _), want, got in zip(case.outputs, expected, actual, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol, err_msg=f"{case.name}: {name}")


def test_every_rule_has_a_case() -> None:
    covered = {node.op_type for case in CASES for node in case.nodes}
    assert set(RULES) <= covered, sorted(set(RULES) - covered)
