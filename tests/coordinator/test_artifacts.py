"""Segment artifact bundles: build, load, cache by content, consistent manifests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import coordinator.build.artifacts as artifacts_module  # noqa: E402
from coordinator.build.artifacts import SegmentArtifactError, build_segment_artifacts  # noqa: E402
from coordinator.build.bundle import pack_dir  # noqa: E402
from edge_agent.bundle import ArtifactStore  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from tests.coordinator.conftest import INPUT_SHAPE, Exported  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

SEGMENTS = {"mlp": ("fc1", "fc2"), "cnn": ("conv1",), "vgg11": ("features.7", "classifier.0")}


@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_segment_builds_and_loads(
    exported: Callable[[str], Exported], artifact_cache: Path, name: str, tmp_path: Path
) -> None:
    forward = exported(name).forward
    trainable = forward.params_of(SEGMENTS[name])
    built = build_segment_artifacts(forward, trainable, artifact_cache)
    manifest = json.loads((built.directory / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["optimizer"] == "adamw"
    assert manifest["order"] == list(forward.order)
    assert manifest["trainable"] == list(trainable) == list(built.trainable)
    assert manifest["segment_buffers"] == list(forward.buffers_of(SEGMENTS[name]))
    assert manifest["shapes"] == {k: list(v.shape) for k, v in forward.tensors.items()}
    assert manifest["num_classes"] == 10 and manifest["input_name"] == "input"
    assert not (built.directory / "checkpoint").exists()  # weights travel separately, not in the bundle
    assert len(built.blob) < 512 * 1024
    # what an agent does: receive the blob, store it by digest, open and run it
    directory = ArtifactStore(tmp_path / "store").put(built.sha256, built.blob)
    trainer = OrtTrainer(threads=1)
    trainer.open(directory)
    trainer.set_weights(forward.tensors)
    x = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)
    stats = trainer.evaluate(x, np.arange(4))
    assert np.isfinite(stats.loss) and stats.samples == 4


def test_second_build_is_a_cache_hit(
    exported: Callable[[str], Exported], artifact_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = exported("cnn").forward
    trainable = forward.params_of(["fc", "head"])
    first = build_segment_artifacts(forward, trainable, artifact_cache, optimizer="sgd")

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a cached segment")

    monkeypatch.setattr(artifacts_module, "generate_segment", must_not_run)
    started = time.perf_counter()
    second = build_segment_artifacts(forward, tuple(reversed(trainable)), artifact_cache, optimizer="sgd")
    assert time.perf_counter() - started < 1.0
    assert (second.sha256, second.directory, second.blob) == (first.sha256, first.directory, first.blob)


def test_generation_is_deterministic(exported: Callable[[str], Exported], tmp_path: Path) -> None:
    forward = exported("mlp").forward
    trainable = forward.params_of(["head"])
    one = build_segment_artifacts(forward, trainable, tmp_path / "a")
    two = build_segment_artifacts(forward, trainable, tmp_path / "b")
    assert one.sha256 == two.sha256 and pack_dir(two.directory) == two.blob


def test_manifests_agree_across_segments(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("cnn").forward
    groups = [g.name for g in forward.groups]
    built = [build_segment_artifacts(forward, forward.params_of([g]), artifact_cache) for g in groups]
    manifests = [json.loads((b.directory / "manifest.json").read_text()) for b in built]
    assert len({b.sha256 for b in built}) == len(groups)
    for key in ("order", "shapes", "buffers", "input_name", "label_name", "logits_name", "loss_name"):
        assert all(m[key] == manifests[0][key] for m in manifests), key
    assert [m["trainable"] for m in manifests] == [list(forward.params_of([g])) for g in groups]


def test_bad_requests_are_refused(exported: Callable[[str], Exported], artifact_cache: Path) -> None:
    forward = exported("cnn").forward
    with pytest.raises(SegmentArtifactError, match="running_mean"):
        build_segment_artifacts(forward, ["conv0.bn.running_mean"], artifact_cache)
    with pytest.raises(SegmentArtifactError, match="at least one"):
        build_segment_artifacts(forward, [], artifact_cache)
    with pytest.raises(SegmentArtifactError, match="optimizer"):
        build_segment_artifacts(forward, forward.params_of(["head"]), artifact_cache, optimizer="lamb")
