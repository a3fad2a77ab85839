"""Every lowered operator against ORT's own training kernel, on random inputs, in one process.

The cases (shapes, attributes, edge cases) are in lowering_cases*.py; plain onnxruntime
reruns the same lowered graphs in tests/portable (see portable_cases.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from coordinator.build.lowering import RULES  # noqa: E402
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


def _maxpool_cases() -> list[OpCase]:
    return [case for case in CASES if case.name.startswith("MaxPoolGrad_")]


@pytest.mark.parametrize("case", _maxpool_cases(), ids=lambda case: case.name)
def test_maxpool_grad_reads_no_shape_of_the_pooled_input_when_dx_is_declared(case: OpCase) -> None:
    # a Shape node on the pooled input would keep that activation alive until the backward pass
    nodes = lowered_model(case, run(original_model(case), case)).graph.node
    assert not [n for n in nodes if n.op_type == "Shape" and "X" in n.input]


@pytest.mark.parametrize("case", _maxpool_cases(), ids=lambda case: case.name)
def test_maxpool_grad_without_a_declared_shape_reads_the_pooled_input_shape(case: OpCase) -> None:
    from dataclasses import replace

    expected = run(original_model(case), case)
    undeclared = replace(case, static={})
    model = lowered_model(undeclared, expected)
    assert [n for n in model.graph.node if n.op_type == "Shape" and "X" in n.input]
    np.testing.assert_allclose(run(model, case)[0], expected[0], rtol=case.rtol, atol=case.atol)


def test_slice_grad_pads_with_unit_steps_and_scatters_otherwise() -> None:
    # a Pad allocates only dX; the scatter form also builds int64 positions of the whole input
    def ops(name: str) -> set[str]:
        case = next(case for case in CASES if case.name == name)
        return {node.op_type for node in lowered_model(case, run(original_model(case), case)).graph.node}

    assert "Pad" in ops("SliceGrad_qkv_last_axis") and "Range" not in ops("SliceGrad_qkv_last_axis")
    assert "Pad" not in ops("SliceGrad_strided") and "ScatterElements" in ops("SliceGrad_strided")
