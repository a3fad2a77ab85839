"""Forward and inference export: names, BatchNorm stats, IR version, layer groups, deployability."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from coordinator.export import ExportError, export_forward, export_inference, load_tensors, model_tensors  # noqa: E402
from models import layer_groups  # noqa: E402
from tests.coordinator.conftest import INPUT_SHAPE, MODEL_NAMES, Exported  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_initializer_names_are_the_float_state_dict_names(exported: Callable[[str], Exported], name: str) -> None:
    item = exported(name)
    proto = onnx.load(item.forward.onnx_path)
    floats = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    state = [k for k, v in item.model.state_dict().items() if v.is_floating_point()]
    assert sorted(floats) == sorted(state)
    assert tuple(floats) == item.forward.order
    assert list(item.forward.tensors) == list(item.forward.order)
    assert all(v.dtype == np.float32 for v in item.forward.tensors.values())
    assert not any(k.endswith("num_batches_tracked") for k in item.forward.order)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_keeps_batchnorm_running_stats(exported: Callable[[str], Exported], name: str) -> None:
    item = exported(name)
    proto = onnx.load(item.forward.onnx_path)
    onnx_values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    after = model_tensors(item.model)  # the torch model is back in its pre-export state
    for key, value in item.forward.tensors.items():
        np.testing.assert_array_equal(onnx_values[key], value, err_msg=key)
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    stats = [k for k in item.forward.order if k.endswith("running_var")]
    assert (not stats) == (name == "mlp")
    assert all(not np.allclose(item.forward.tensors[k], 1.0) for k in stats)  # non-trivial stats survived


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_ir_version_is_loadable_by_ort_1_19(exported: Callable[[str], Exported], name: str) -> None:
    assert onnx.load(exported(name).forward.onnx_path).ir_version <= 10


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_groups_partition_the_tensors(exported: Callable[[str], Exported], name: str) -> None:
    item = exported(name)
    groups = item.forward.groups
    assert [g.name for g in groups] == layer_groups(item.model)
    names = [n for g in groups for n in (*g.params, *g.buffers)]
    assert sorted(names) == sorted(item.forward.order)
    assert len(names) == len(set(names))
    params = {n for n, _ in item.model.named_parameters()}
    assert all(g.params and set(g.params) <= params and not set(g.buffers) & params for g in groups)
    assert item.forward.params_of([groups[-1].name]) == groups[-1].params


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inference_export_matches_torch_eval(exported: Callable[[str], Exported], name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    item = exported(name)
    rng = np.random.default_rng(3)
    tensors = {k: (v * rng.uniform(0.9, 1.1, v.shape)).astype(np.float32) for k, v in item.forward.tensors.items()}
    before = model_tensors(item.model)
    path = export_inference(item.model, INPUT_SHAPE, tmp_path / "model.onnx", tensors)
    assert onnx.load(path).ir_version <= 10
    for key, value in model_tensors(item.model).items():  # the caller's model is untouched
        np.testing.assert_array_equal(value, before[key])
    x = rng.standard_normal((5, *INPUT_SHAPE)).astype(np.float32)  # batch 5 != export batch: dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    reference = _torch_eval(item.model, tensors, x)
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)


def _torch_eval(model: torch.nn.Module, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    import copy

    twin = copy.deepcopy(model)
    load_tensors(twin, tensors)
    twin.eval()
    with torch.no_grad():
        return twin(torch.from_numpy(x)).numpy()


def test_load_tensors_rejects_missing_and_misshapen(exported: Callable[[str], Exported]) -> None:
    import copy

    item = exported("mlp")
    twin = copy.deepcopy(item.model)
    tensors = dict(item.forward.tensors)
    with pytest.raises(ExportError, match="missing"):
        load_tensors(twin, {k: v for k, v in tensors.items() if k != "head.bias"})
    with pytest.raises(ExportError, match="shape"):
        load_tensors(twin, {**tensors, "head.bias": np.zeros(3, np.float32)})


class _NormNet(torch.nn.Module):
    """A LayerNorm model (not in the registry): norm -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def test_layernorm_gets_the_outputs_ort_gradients_need(tmp_path: Path) -> None:
    torch.manual_seed(0)
    forward = export_forward(_NormNet(), (8,), 3, tmp_path)
    nodes = [n for n in onnx.load(forward.onnx_path).graph.node if n.op_type == "LayerNormalization"]
    assert nodes and all(len(n.output) == 3 for n in nodes)
    assert [g.name for g in forward.groups] == ["proj", "norm", "head"]


def test_unused_parameters_are_refused(tmp_path: Path) -> None:
    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 2)
            self.spare = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)

    with pytest.raises(ExportError, match="spare"):
        export_forward(Unused(), (4,), 2, tmp_path)
