"""Everything a trial needs before agents join: model, forward export, segments, artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from coordinator.artifacts import SegmentArtifacts, build_front_artifacts, build_segment_artifacts
from coordinator.config import TrialConfig
from coordinator.errors import ConfigError
from coordinator.export import ForwardModel, export_forward, export_front
from coordinator.portable_artifacts import build_portable_artifacts
from coordinator.scheduler import (
    GroupInfo,
    Plan,
    Segment,
    cut_segments,
    fedavg_plan,
    snake_plan,
    split_plan,
    split_segments,
)
from models import InputSpec, build_model
from models.split import split_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    model: nn.Module
    forward: ForwardModel
    groups: tuple[GroupInfo, ...]
    segments: tuple[Segment, ...]
    artifacts: dict[tuple[int, str], SegmentArtifacts]  # by (segment index, kind: "ort" | "portable")
    cut: str = ""  # split learning: the last layer group of the agents' front

    def plan_for(self, config: TrialConfig) -> Callable[[list[str]], Plan]:
        if config.algorithm == "split":
            return lambda agents: split_plan(agents, self.groups, config.rounds, self.cut)
        if config.algorithm == "fedavg":
            return lambda agents: fedavg_plan(agents, self.groups, config.rounds)
        return lambda agents: snake_plan(agents, self.groups, config.rounds, config.mode)


def group_infos(forward: ForwardModel) -> tuple[GroupInfo, ...]:
    return tuple(
        GroupInfo(g.name, g.params, g.buffers, int(sum(np.prod(forward.tensors[p].shape) for p in g.params)))
        for g in forward.groups
    )


def prepare(
    config: TrialConfig, spec: InputSpec, work: Path, on_segment: Callable[[int, int], None] | None = None
) -> Prepared:
    """Build the model (seeded), export it, split it into segments and build each segment's artifacts."""
    import torch

    torch.manual_seed(config.seed)
    model = build_model(config.model, spec)
    forward = export_forward(model, (spec.channels, spec.height, spec.width), spec.num_classes, work / "export")
    groups = group_infos(forward)
    if config.algorithm == "split":
        return _prepare_split(config, spec, work, model, forward, groups)
    count = 1 if config.algorithm == "fedavg" else min(config.agents, len(groups))
    segments = tuple(split_segments(groups, count))
    artifacts = {}
    for seg in segments:  # both kinds: which one an agent gets depends on the backend its hello names
        cache, opt, kd = work / "artifacts", config.train.optimizer, config.train.kd_alpha > 0
        artifacts[seg.index, "ort"] = build_segment_artifacts(forward, seg.params, cache, optimizer=opt, kd=kd)
        artifacts[seg.index, "portable"] = build_portable_artifacts(forward, seg.params, cache, optimizer=opt, kd=kd)
        log.info("segment %d (%s): bundle %s, %d bytes", seg.index, ", ".join(seg.groups),
                 artifacts[seg.index, "ort"].sha256[:12], len(artifacts[seg.index, "ort"].blob))  # fmt: skip
        if on_segment:
            on_segment(seg.index + 1, len(segments))
    return Prepared(model, forward, groups, segments, artifacts)


def split_cut(config: TrialConfig, groups: tuple[GroupInfo, ...]) -> str:
    """The trial's cut (``train.split_cut``, default: the first layer group), checked against the model."""
    cut = config.train.split_cut or groups[0].name
    names = [g.name for g in groups]
    if cut not in names[:-1]:
        raise ConfigError(
            f"train.split_cut = {cut!r} is not a layer group of {config.model} that leaves the coordinator a back; "
            f"choose one of: {', '.join(names[:-1])}"
        )
    return cut


def _prepare_split(
    config: TrialConfig, spec: InputSpec, work: Path, model: nn.Module, forward: ForwardModel,
    groups: tuple[GroupInfo, ...],
) -> Prepared:  # fmt: skip
    """Split learning: export the front (input -> activations) and build its one ORT bundle."""
    cut = split_cut(config, groups)
    front, back = cut_segments(groups, cut)
    front_onnx = export_front(model, split_model(model, cut)[0], (spec.channels, spec.height, spec.width),
                              work / "export")  # fmt: skip
    bundle = build_front_artifacts(front_onnx, work / "artifacts", optimizer=config.train.optimizer)
    log.info("split after %s: front %s (%d params) on the agents, back %s (%d params) on the coordinator",
             cut, ", ".join(front.groups), front.num_params, ", ".join(back.groups), back.num_params)  # fmt: skip
    return Prepared(model, forward, groups, (front, back), {(0, "ort"): bundle}, cut)
