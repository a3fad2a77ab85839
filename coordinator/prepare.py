"""Everything a trial needs before agents join: model, forward export, segments, artifacts."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from coordinator.build.artifacts import SegmentArtifacts, build_front_artifacts, build_segment_artifacts
from coordinator.build.portable_artifacts import build_portable_artifacts
from coordinator.config import TrialConfig
from coordinator.costs import profile_groups
from coordinator.errors import ConfigError
from coordinator.export import (
    TASK_CAUSAL_LM,
    TASK_CLASSIFY,
    ExportError,
    ForwardModel,
    export_forward,
    export_front,
    load_tensors,
)
from coordinator.lora import add_adapters, lora_groups
from coordinator.plan import AgentProfile, GroupInfo, Plan, Segment
from coordinator.reroute import reroute
from coordinator.scheduler import fedavg_plan, snake_plan, split_plan
from coordinator.skew import decide, distances, label_mix
from edge_agent.protocol.messages import Hello
from models import InputSpec, build_model
from models.split import split_model

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: nn.Module
    forward: ForwardModel
    groups: tuple[GroupInfo, ...]
    config: TrialConfig
    work: Path
    plan: Plan | None = None  # once the agents have joined
    artifacts: dict[tuple[int, str], SegmentArtifacts] = field(default_factory=dict)  # (segment, kind) of the plan

    def plan_for(self, config: TrialConfig) -> Callable[[Mapping[str, Hello]], Plan]:
        def plan(hellos: Mapping[str, Hello]) -> Plan:
            fleet = [profile_of(h, config) for _, h in sorted(hellos.items())]
            labels = {a: h.label_histogram for a, h in hellos.items()} if self.forward.task == TASK_CLASSIFY else None
            return make_plan(config, self.groups, fleet, labels)

        return plan

    def reroute_for(self, config: TrialConfig) -> Callable[[Plan, Plan, int, Mapping[str, Hello]], Plan]:
        """For the controller: the rest of a plan re-routed over the agents still available."""

        def again(plan: Plan, original: Plan, start: int, hellos: Mapping[str, Hello]) -> Plan:
            fleet = [profile_of(h, config) for _, h in sorted(hellos.items())]
            return reroute(plan, original, start, fleet, self.groups, config.train.batch_size, config.train.optimizer)

        return again

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.plan.segments if self.plan is not None else ()

    @property
    def cut(self) -> str:
        """Split learning: the last layer group of the agents' front."""
        return split_cut(self.config, self.groups)

    def build_artifacts(self, plan: Plan) -> None:
        """Both bundle kinds of every segment the plan uses (cached by content under ``work``); split
        learning: the front's one ORT bundle."""
        self.plan, self.artifacts = plan, {}
        cache, opt = self.work / "artifacts", self.config.train.optimizer
        kd = self.config.train.kd_alpha > 0 or (
            plan.skew is not None and plan.skew.active
        )  # KD bundles also adjust logits
        if plan.algorithm == "split":
            shape = self.forward.input_shape
            front_onnx = export_front(self.model, split_model(self.model, self.cut)[0], shape, self.work / "export")
            self.artifacts[0, "ort"] = build_front_artifacts(front_onnx, cache, optimizer=opt)
            front, back = plan.segments
            log.info("split after %s: front %s (%d params) on the agents, back %s (%d params) on the coordinator",
                     self.cut, ", ".join(front.groups), front.num_params, ", ".join(back.groups), back.num_params)  # fmt: skip
            return
        for seg in plan.segments:  # both kinds: which one an agent gets depends on the backend its hello names
            self.artifacts[seg.index, "ort"] = build_segment_artifacts(self.forward, seg.params, cache, opt, kd)
            self.artifacts[seg.index, "portable"] = build_portable_artifacts(self.forward, seg.params, cache, opt, kd)
            log.info("segment %d (%s): bundle %s, %d bytes", seg.index, ", ".join(seg.groups),
                     self.artifacts[seg.index, "ort"].sha256[:12], len(self.artifacts[seg.index, "ort"].blob))  # fmt: skip

    def artifacts_for(self, plan: Plan) -> tuple[dict[tuple[int, str], tuple[str, int]], dict[str, bytes]]:
        """For the controller: build the plan's bundles; (segment, kind) -> (sha256, size), and the blobs."""
        self.build_artifacts(plan)
        arts = self.artifacts
        return {key: (a.sha256, len(a.blob)) for key, a in arts.items()}, {a.sha256: a.blob for a in arts.values()}


def profile_of(hello: Hello, config: TrialConfig) -> AgentProfile:
    """The planner's view of an agent: its hello, and how many samples one hop of this trial trains."""
    t = config.train
    samples = t.epochs * hello.num_train
    if t.max_steps:
        samples = min(samples, t.max_steps * t.batch_size)
    # the hello's idle footprint was measured with the data loaded: no separate data term
    return AgentProfile(
        hello.agent_id, float(hello.memory_budget_mb), float(hello.baseline_mb or 0.0), hello.gflops,
        hello.backend, samples,
    )  # fmt: skip


def split_cut(config: TrialConfig, groups: Sequence[GroupInfo]) -> str:
    """The trial's cut (``train.split_cut``, default: the first layer group), checked against the model."""
    cut = config.train.split_cut or groups[0].name
    names = [g.name for g in groups]
    if cut not in names[:-1]:
        raise ConfigError(
            f"train.split_cut = {cut!r} is not a layer group of {config.model} that leaves the coordinator a back; "
            f"choose one of: {', '.join(names[:-1])}"
        )
    return cut


def make_plan(
    config: TrialConfig,
    groups: Sequence[GroupInfo],
    fleet: Sequence[AgentProfile | str],
    labels: Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """The trial's plan; ``labels`` (agent -> training samples per class, from the hellos) decides a snake
    trial's label-skew methods (:mod:`coordinator.skew`), which the plan carries and prints."""
    t = config.train
    if config.algorithm == "split":  # the agents' memory budgets are not planned: the front is the small side
        return split_plan(fleet, groups, config.rounds, split_cut(config, groups))
    if config.algorithm in ("fedavg", "fedprox"):  # FedProx: FedAvg's plan, a proximal term in every hop
        return fedavg_plan(fleet, groups, config.rounds, t.batch_size, t.optimizer)
    if labels is None:
        return snake_plan(fleet, groups, config.rounds, config.mode, t.batch_size, t.optimizer)
    methods = decide(t, labels)
    head_by = distances(labels) if methods.active and t.balanced_head else None
    plan = snake_plan(fleet, groups, config.rounds, config.mode, t.batch_size, t.optimizer, head_by)
    notes = [f"labels {a}: {label_mix(labels[a])}" for a in sorted(labels) if len(labels) <= 16]
    if head_by:
        notes.append(head_note(plan, head_by))
    return dataclasses.replace(plan, skew=methods, notes=tuple(notes))


def head_note(plan: Plan, head_by: Mapping[str, float]) -> str:
    """Why the trial's last hop went to its agent (for ``plan`` output)."""
    last = plan.hops[-1].agent
    others = sorted(d for a, d in head_by.items() if a != last)
    spread = f"{others[0]:.2f}-{others[-1]:.2f}" if others else "none"
    return (f"the last hop (the classifier the final model keeps) goes to {last}: label mix distance "
            f"{head_by.get(last, float('nan')):.2f} from the fleet's, the closest of the last sweep's agents "
            f"within the time and memory limits (others {spread}; train.balanced_head)")  # fmt: skip


def group_infos(forward: ForwardModel, model: nn.Module) -> tuple[GroupInfo, ...]:
    """Layer groups with their sizes and measured costs (activations, compute) per sample."""
    tokens = forward.task == TASK_CAUSAL_LM
    costs = profile_groups(model, forward.input_shape, [g.name for g in forward.groups], tokens)

    def size(names: tuple[str, ...]) -> int:
        return int(sum(forward.tensors[n].size for n in names))

    return tuple(
        GroupInfo(
            g.name,
            g.params,
            g.buffers,
            size(g.params),
            size(g.buffers),
            costs[g.name].act_bytes,
            costs[g.name].flops,
        )  # fmt: skip
        for g in forward.groups
    )


def prepare(
    config: TrialConfig, spec: InputSpec, work: Path, initial: Mapping[str, np.ndarray] | None = None
) -> Prepared:
    """Build the model (seeded; ``initial``: these weights instead, e.g. a pretrained base), export it and
    measure its layer groups. Segment artifacts follow the plan, which needs the agents' hellos
    (:meth:`Prepared.build_artifacts`)."""
    import torch

    torch.manual_seed(config.seed)
    model = build_model(config.model, spec)
    if initial is not None:
        try:
            load_tensors(model, initial)
        except ExportError as exc:
            raise ConfigError(f"the base model does not fit {config.model}: {exc}") from exc
    if config.lora.enabled:  # after any base weights are in: the adapters start as a no-op on them
        add_adapters(model, config.lora)
    if spec.seq_len:  # a language model: token ids [N, seq_len], num_classes = vocabulary size
        forward = export_forward(model, (spec.seq_len,), spec.num_classes, work / "export", TASK_CAUSAL_LM)
    else:
        forward = export_forward(model, (spec.channels, spec.height, spec.width), spec.num_classes, work / "export")
    groups = group_infos(forward, model)
    if config.lora.enabled:  # segments train only adapters; frozen tensors travel once per agent
        groups = lora_groups(groups, {name: t.size for name, t in forward.tensors.items()})
    prepared = Prepared(model, forward, groups, config, work)
    if config.algorithm == "split":
        split_cut(config, prepared.groups)  # a bad cut fails now, not once the agents have joined
    return prepared
