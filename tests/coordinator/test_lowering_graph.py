"""Whole-graph lowering and portable bundles: interface, operators, caching, manifests, refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import helper  # noqa: E402

import coordinator.build.portable_artifacts as portable_module  # noqa: E402
from coordinator.build.artifacts import SegmentArtifactError, build_segment_artifacts  # noqa: E402
from coordinator.build.bundle import pack_dir  # noqa: E402
from coordinator.build.lowering import Builder, Interface, LoweringError, lower_node, lower_training_model, unportable  # noqa: E402
from coordinator.build.portable_artifacts import build_portable_artifacts  # noqa: E402
from edge_agent.bundle import ArtifactStore  # noqa: E402
from edge_agent.portable_trainer import PortableTrainer  # noqa: E402
from edge_agent.protocol.manifest import ManifestError, SegmentManifest, read_manifest  # noqa: E402
from edge_agent.trainer import TrainerError  # noqa: E402
from tests.coordinator.conftest import INPUT_SHAPE, Exported  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

SEGMENTS = {"mlp": ("fc1", "fc2"), "cnn": ("conv1",), "vgg11": ("features.7", "classifier.0")}


@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_portable_bundle_has_the_promised_interface(
    exported: Callable[[str], Exported], artifact_cache: Path, name: str, tmp_path: Path
) -> None:
    forward = exported(name).forward
    trainable = forward.params_of(SEGMENTS[name])
    built = build_portable_artifacts(forward, trainable, artifact_cache, optimizer="sgd")
    manifest = read_manifest(built.directory)
    assert manifest.kind == "portable" and manifest.optimizer == "sgd" and manifest.trainable == trainable
    assert sorted(p.name for p in built.directory.iterdir()) == ["eval.onnx", "manifest.json", "train.onnx"]
    train = onnx.load(built.directory / manifest.train_graph)
    evaluation = onnx.load(built.directory / manifest.eval_graph)
    for model in (train, evaluation):
        assert model.ir_version <= 10 and not unportable(model.graph.node)
        assert {o.domain for o in model.opset_import} <= {"", "com.microsoft"}
        assert [i.name for i in model.graph.input] == ["input", "labels", *forward.order]
    outputs = [manifest.loss_name, manifest.logits_name]
    grads = [manifest.grad_outputs[n] for n in trainable]
    stats = [manifest.buffer_outputs[n] for n in forward.buffers]
    assert [o.name for o in train.graph.output] == outputs + grads + stats
    assert [o.name for o in evaluation.graph.output] == outputs
    assert len(built.blob) < 512 * 1024
    directory = ArtifactStore(tmp_path / "store").put(built.sha256, built.blob)  # what an agent does
    trainer = PortableTrainer(threads=1)
    trainer.open(directory)
    trainer.set_weights(forward.tensors)
    x = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    assert np.isfinite(trainer.evaluate(x, np.arange(4)).loss)


def test_second_build_is_a_cache_hit_and_bytes_are_stable(
    exported: Callable[[str], Exported], artifact_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = exported("cnn").forward
    trainable = forward.params_of(["fc", "head"])
    first = build_portable_artifacts(forward, trainable, artifact_cache)
    fresh = build_portable_artifacts(forward, trainable, tmp_path / "other")
    assert fresh.sha256 == first.sha256 and pack_dir(fresh.directory) == fresh.blob  # deterministic

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("lowered a cached segment again")

    monkeypatch.setattr(portable_module, "lower_segment", must_not_run)
    started = time.perf_counter()
    second = build_portable_artifacts(forward, tuple(reversed(trainable)), artifact_cache)
    assert time.perf_counter() - started < 1.0 and second == first
    ort = build_segment_artifacts(forward, trainable, artifact_cache)
    assert ort.directory != first.directory and "kind" not in json.loads((ort.directory / "manifest.json").read_text())


def test_bad_requests_are_refused(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("mlp").forward
    with pytest.raises(SegmentArtifactError, match="not trainable"):
        build_portable_artifacts(forward, ["fc0.nope"], artifact_cache)
    with pytest.raises(SegmentArtifactError, match="optimizer"):
        build_portable_artifacts(forward, forward.params_of(["head"]), artifact_cache, optimizer="lion")


def test_the_portable_trainer_refuses_ort_bundles(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("mlp").forward
    built = build_segment_artifacts(forward, forward.params_of(["head"]), artifact_cache)
    with pytest.raises(TrainerError, match="portable bundle"):
        PortableTrainer().open(built.directory)


def test_training_graph_must_match_the_trainable_set(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("mlp").forward
    built = build_segment_artifacts(forward, forward.params_of(["head"]), artifact_cache)
    model = onnx.load(built.directory / "training_model.onnx")
    names = Interface("input", "labels", "onnx::loss::2", "logits", forward.order, forward.params_of(["fc0"]))
    with pytest.raises(LoweringError, match="accumulates gradients"):
        lower_training_model(model, names)


def test_unknown_training_operators_are_named() -> None:
    node = helper.make_node("FancyGrad", ["dY", "X"], ["dX"], domain="com.microsoft", name="fancy")
    with pytest.raises(LoweringError, match="com.microsoft:FancyGrad"):
        lower_node(Builder(), node)
    graph_ops = [helper.make_node("MaxPoolGrad", ["dY", "I"], ["dX"]), helper.make_node("Relu", ["a"], ["b"])]
    assert unportable(graph_ops) == ["ai.onnx:MaxPoolGrad"]


def test_portable_manifest_round_trips_and_is_checked() -> None:
    base = dict(
        input_name="input",
        label_name="labels",
        logits_name="logits",
        loss_name="loss",
        order=("w", "mean"),
        shapes={"w": (2,), "mean": (2,)},
        trainable=("w",),
        buffers=("mean",),
        segment_buffers=("mean",),
        optimizer="adamw",
        num_classes=2,
        input_shape=(3,),
    )
    portable = dict(kind="portable", train_graph="train.onnx", eval_graph="eval.onnx")
    manifest = SegmentManifest(**base, **portable, grad_outputs={"w": "w_grad"}, buffer_outputs={"mean": "m2"})
    assert SegmentManifest.from_json(manifest.to_json()) == manifest
    assert "kind" not in json.loads(SegmentManifest(**base).to_json())  # ORT manifests read and hash as before
    with pytest.raises(ManifestError, match="grad_outputs"):
        SegmentManifest(**base, **portable, grad_outputs={}, buffer_outputs={"mean": "m2"})
    with pytest.raises(ManifestError, match="kind"):
        SegmentManifest(**base, kind="tflite")


def test_the_portable_trainer_refuses_graphs_that_do_not_match_the_manifest(
    exported: Callable[[str], Exported], artifact_cache: Path, tmp_path: Path
) -> None:
    import shutil

    forward = exported("mlp").forward
    built = build_portable_artifacts(forward, forward.params_of(["head"]), artifact_cache)
    broken = tmp_path / "bundle"
    shutil.copytree(built.directory, broken)
    model = onnx.load(broken / "train.onnx")
    model.graph.input.append(helper.make_tensor_value_info("mystery", onnx.TensorProto.FLOAT, [1]))
    onnx.save(model, broken / "train.onnx")
    with pytest.raises(TrainerError, match="mystery"):
        PortableTrainer().open(broken)
    (broken / "train.onnx").write_bytes(b"not onnx")
    with pytest.raises(TrainerError, match="cannot load"):
        PortableTrainer().open(broken)
