"""Torch-free fixtures for the ONNX Runtime trainer: a toy forward ONNX built with onnx.helper,
its segment artifacts (built on this machine, as a device would), and a separable data set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

FEATURES, HIDDEN, CLASSES = 4, 16, 3


@dataclass(frozen=True)
class ToyModel:
    onnx_path: Path
    tensors: dict[str, np.ndarray]  # initial weights by wire name


def _initial_tensors(batchnorm: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {
        "fc0.weight": rng.normal(0, 0.5, (HIDDEN, FEATURES)),
        "fc0.bias": np.zeros(HIDDEN),
    }
    if batchnorm:
        tensors |= {
            "bn.weight": np.ones(HIDDEN),
            "bn.bias": np.zeros(HIDDEN),
            "bn.running_mean": rng.normal(0, 0.1, HIDDEN),
            "bn.running_var": rng.uniform(0.5, 1.5, HIDDEN),
        }
    tensors |= {"head.weight": rng.normal(0, 0.3, (CLASSES, HIDDEN)), "head.bias": np.zeros(CLASSES)}
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def build_toy_onnx(path: Path, batchnorm: bool) -> ToyModel:
    """input [N, 4] -> fc0 (Gemm) -> [BatchNorm, training mode] -> Relu -> head (Gemm) -> logits [N, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tensors = _initial_tensors(batchnorm)
    nodes = [helper.make_node("Gemm", ["input", "fc0.weight", "fc0.bias"], ["h0"], transB=1, name="fc0")]
    hidden = "h0"
    if batchnorm:  # as torch exports BatchNorm1d in training mode: three outputs
        bn_in = ["h0", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                bn_in,
                ["h1", "bn_mean_out", "bn_var_out"],
                epsilon=1e-5,
                momentum=0.9,
                training_mode=1,
                name="bn",
            )
        )
        hidden = "h1"
    nodes += [
        helper.make_node("Relu", [hidden], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "head.weight", "head.bias"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return ToyModel(path, tensors)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[bool], ToyModel]:
    cache: dict[bool, ToyModel] = {}

    def get(batchnorm: bool = False) -> ToyModel:
        if batchnorm not in cache:
            folder = tmp_path_factory.mktemp("toy")
            cache[batchnorm] = build_toy_onnx(folder / "forward.onnx", batchnorm)
        return cache[batchnorm]

    return get


@pytest.fixture(scope="session")
def segment(tmp_path_factory: pytest.TempPathFactory, toy: Callable[[bool], ToyModel]) -> Callable[..., Path]:
    """``segment(trainable, optimizer="adamw", batchnorm=False)``: an artifact directory (cached)."""
    from coordinator.build.ort_artifacts import generate_segment

    cache: dict[tuple[tuple[str, ...], str, bool], Path] = {}

    def get(trainable: tuple[str, ...], optimizer: str = "adamw", batchnorm: bool = False) -> Path:
        key = (trainable, optimizer, batchnorm)
        if key not in cache:
            out = tmp_path_factory.mktemp("segment")
            generate_segment(toy(batchnorm).onnx_path, trainable, out, optimizer=optimizer)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """A deterministic, linearly separable 3-class problem: 3 well-separated Gaussian blobs in 4-D."""
    rng = np.random.default_rng(42)
    centres = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 3]], dtype=np.float32)
    y = rng.integers(0, CLASSES, 600)
    x = centres[y] + rng.normal(0, 0.6, (600, FEATURES)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)
