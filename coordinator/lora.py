"""LoRA trials on the coordinator: the settings, the layer groups the planner sees, and the merged export.

With ``[lora] rank > 0`` the model's target projections get adapters (:mod:`models.lora`) before the
forward export, and every segment's trainable set is only the adapters of its layer groups: base
weights, embeddings, LayerNorms and the head are frozen for the whole trial. The planner then sees one
group per block that has adapters (``params`` = its adapters, ``frozen`` = its base weights); groups
without adapters (``embed``, ``head``) train nothing and are folded, costs and tensors, into their
neighbour. Transfers version the frozen tensors as one entry (:func:`coordinator.plan.versioned_layout`)
that never changes, so an agent receives them once and afterwards only adapters travel. The inference
ONNX a trial exports is merged (``W + alpha/rank * B A``): same input and output as without LoRA.

Trial file::

    [lora]
    rank = 0                  # adapter rank (0 = off: segments train whole layer groups)
    alpha = 16.0              # scale = alpha / rank
    targets = ""              # comma-separated projection-name suffixes; "" = every projection of the
                              #   blocks (gpt: attn.qkv,attn.proj,mlp.fc,mlp.proj;
                              #   opt: q_proj,k_proj,v_proj,out_proj,fc1,fc2)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.errors import ConfigError
from coordinator.plan import GroupInfo

if TYPE_CHECKING:
    from torch import nn

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")  # as models.lora (kept here so planning needs no torch)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 0  # 0 = off
    alpha: float = 16.0  # scale = alpha / rank
    targets: str = ""  # comma-separated module-name suffixes; "" = the model's default projections

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def problems(self) -> list[str]:
        """What is wrong with the settings (empty: nothing)."""
        out = []
        if self.rank < 0:
            out.append(f"lora.rank must be >= 0 (0 = off), not {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            out.append(f"lora.alpha must be > 0, not {self.alpha}")
        if any(not t.replace(".", "").replace("_", "").isalnum() for t in self.target_list):
            out.append(f"lora.targets must be comma-separated module names, not {self.targets!r}")
        return out

    def as_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.target_list)}


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """Every projection of the blocks of a model we know (models.gpt, Hugging Face OPT)."""
    from torch import nn

    from models.lora import GPT_TARGETS, OPT_TARGETS

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for targets in (GPT_TARGETS, OPT_TARGETS):
        if any(n.endswith("." + t) for n in names for t in targets):
            return targets
    raise ConfigError("lora.targets is empty and the model is not one whose projections are known; name them")


def add_adapters(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze ``model`` and give its target projections adapters; returns the adapter names."""
    from models.lora import apply_lora

    targets = settings.target_list or default_targets(model)
    try:
        return apply_lora(model, settings.rank, settings.alpha, targets)
    except ValueError as exc:
        raise ConfigError(f"lora: {exc}") from exc


def lora_groups(groups: Sequence[GroupInfo], sizes: Mapping[str, int]) -> tuple[GroupInfo, ...]:
    """The planner's groups of a LoRA trial: per group with adapters, the adapters as ``params`` and its
    other parameters as ``frozen``; a group without adapters is folded (tensors, memory and compute) into
    the next group that has some (after the last one: into the last). ``sizes``: elements per tensor name."""
    split = [(g, tuple(p for p in g.params if is_adapter(p))) for g in groups]
    keep = [i for i, (_, adapters) in enumerate(split) if adapters]
    if not keep:
        raise ConfigError("lora: no layer group has adapters (do the targets name the blocks' projections?)")
    home = {i: next((k for k in keep if k >= i), keep[-1]) for i in range(len(groups))}
    out = []
    for k in keep:
        members = [groups[i] for i in range(len(groups)) if home[i] == k]
        adapters = split[k][1]
        frozen = tuple(p for g in members for p in g.params if not is_adapter(p))
        adapter_elems = sum(int(sizes[a]) for a in adapters)
        total = sum(g.num_params + g.num_buffer_elems for g in members)
        out.append(
            dataclasses.replace(
                groups[k],
                params=adapters,
                buffers=tuple(b for g in members for b in g.buffers),
                num_params=adapter_elems,
                num_buffer_elems=total - adapter_elems,
                act_bytes=sum(g.act_bytes for g in members),
                flops=sum(g.flops for g in members),
                frozen=frozen,
            )
        )
    return tuple(out)


def merged_model(model: nn.Module, tensors: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """A copy of ``model`` holding ``tensors`` (if given) with every adapter folded into its base weight:
    the structure and parameter names the model had before LoRA."""
    from coordinator.export import load_tensors
    from models.lora import merge_lora

    merged = copy.deepcopy(model)
    if tensors is not None:
        load_tensors(merged, tensors)
    merge_lora(merged)
    return merged


def has_adapters(model: nn.Module) -> bool:
    from models.lora import has_lora

    return has_lora(model)
