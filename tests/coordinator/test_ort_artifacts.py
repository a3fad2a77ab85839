"""A segment's ONNX Runtime training artifacts (coordinator.build.ort_artifacts), on a toy forward ONNX."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from coordinator.build.bundle import pack_dir  # noqa: E402
from coordinator.build.ort_artifacts import ArtifactError, generate_segment  # noqa: E402
from edge_agent.protocol.manifest import read_manifest  # noqa: E402
from edge_agent.protocol.transfer import sha256_hex  # noqa: E402
from tests.edge_agent.conftest import ToyModel  # noqa: E402

pytestmark = pytest.mark.ort

ALL = ("fc0.weight", "fc0.bias", "head.weight", "head.bias")
HEAD = ("head.weight", "head.bias")


def test_artifacts_are_deterministic_and_checked(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], tmp_path: Path
) -> None:
    again = generate_segment(toy().onnx_path, tuple(reversed(HEAD)), tmp_path / "again")
    assert again.trainable == HEAD
    assert sha256_hex(pack_dir(tmp_path / "again")) == sha256_hex(pack_dir(segment(HEAD)))
    with pytest.raises(ArtifactError, match="not float initializers"):
        generate_segment(toy().onnx_path, ("nope",), tmp_path / "bad")


def test_kd_manifest_names_the_extra_inputs_and_plain_manifests_do_not(
    toy: Callable[..., ToyModel], segment: Callable[..., Path], tmp_path: Path
) -> None:
    kd_segment = tmp_path / "kd"
    generate_segment(toy().onnx_path, ALL, kd_segment, optimizer="sgd", kd=True)
    manifest = read_manifest(kd_segment)
    assert manifest.kd and manifest.kd_inputs == ("teacher_logits", "kd_alpha", "kd_temperature", "logit_adjust")
    data = json.loads((kd_segment / "manifest.json").read_text())
    assert data["kd"] is True and data["kd_inputs"] == list(manifest.kd_inputs)
    plain = json.loads((segment(ALL, "sgd") / "manifest.json").read_text())
    assert "kd" not in plain and "kd_inputs" not in plain and not read_manifest(segment(ALL, "sgd")).kd
