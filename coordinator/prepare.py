"""Everything a trial needs before agents join: model, forward export, segments, artifacts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from coordinator.artifacts import SegmentArtifacts, build_segment_artifacts
from coordinator.config import TrialConfig
from coordinator.export import ForwardModel, export_forward
from coordinator.portable_artifacts import build_portable_artifacts
from coordinator.scheduler import GroupInfo, Plan, Segment, fedavg_plan, snake_plan, split_segments
from models import InputSpec, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    model: nn.Module
    forward: ForwardModel
    groups: tuple[GroupInfo, ...]
    segments: tuple[Segment, ...]
    artifacts: dict[tuple[int, str], SegmentArtifacts]  # by (segment index, kind: "ort" | "portable")

    def plan_for(self, config: TrialConfig) -> Callable[[list[str]], Plan]:
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
