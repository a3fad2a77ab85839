"""Per-layer-group costs of a torch model, measured once on the coordinator: the activations a
training step keeps for its backward pass and the forward compute, both per sample.

Activations are what autograd actually saves (``saved_tensors_hooks``), deduplicated by
storage, attributed to the layer group running when they were saved (work done in the model's
own ``forward`` between groups, such as VGG's classifier ReLUs, goes to the group before it).
Compute is what ``torch.utils.flop_counter`` counts (matrix products and convolutions, a
multiply-accumulate as two), attributed to the group whose module ran it: the same figures as
``Conv2d`` and ``Linear`` layers alone for the CNNs, and for the GPT also attention's products and the
tied head's projection (which runs in ``head`` with the embedding's weight).
The pure cost model (:mod:`coordinator.costmodel`) turns these into per-hop memory and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class GroupCost:
    act_bytes: int  # per sample: tensors saved for backward while this group runs
    flops: int  # per sample, forward


def profile_groups(
    model: nn.Module, input_shape: Sequence[int], groups: Sequence[str], tokens: bool = False
) -> dict[str, GroupCost]:
    """Measure every group of ``model`` (names are module paths) with one 2-sample training forward;
    ``tokens``: the input is int64 token ids (a language model), else float."""
    batch = 2
    modules = dict(model.named_modules())
    missing = [g for g in groups if g not in modules]
    if missing:
        raise ValueError(f"no module(s) {missing} in the model")
    current: list[str] = [groups[0]]
    saved: dict[str, dict[int, int]] = {g: {} for g in groups}  # group -> storage ptr -> bytes
    handles = []

    def enter(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _inputs: object) -> None:
            current[0] = name

        return hook

    for name in groups:
        handles.append(modules[name].register_forward_pre_hook(enter(name)))

    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # a tensor saved twice (an output and the next input) counts once
            seen.add(storage.data_ptr())
            saved[current[0]][storage.data_ptr()] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        x = torch.zeros((batch, *input_shape), dtype=torch.int64 if tokens else torch.float32)
        counter = FlopCounterMode(display=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.random.fork_rng(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counts = counter.get_flop_counts()  # module path under the root's class name -> {op: flops}
    flops = {g: int(sum(counts.get(f"{type(model).__name__}.{g}", {}).values())) for g in groups}
    return {
        g: GroupCost(
            act_bytes=sum(b for ptr, b in saved[g].items() if ptr not in params) // batch,
            flops=flops[g] // batch,
        )
        for g in groups
    }
