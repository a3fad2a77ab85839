"""The LoRA transfer figures' pure part: per-hop payloads over a plan whose frozen tensors are versioned once."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # the tool prepares the GPT

from coordinator.plan import FROZEN_GROUP, GroupInfo  # noqa: E402
from coordinator.scheduler import snake_plan  # noqa: E402
from tools.lora_transfer import hop_payloads  # noqa: E402

BASE, ADAPTER = 4096, 64  # elements per tensor


def groups(lora: bool) -> tuple[GroupInfo, ...]:
    if not lora:
        return tuple(GroupInfo(f"b{i}", (f"b{i}.w",), (), BASE) for i in range(3))
    return tuple(
        GroupInfo(f"b{i}", (f"b{i}.lora_A", f"b{i}.lora_B"), (), 2 * ADAPTER, BASE, frozen=(f"b{i}.w",))
        for i in range(3)
    )


def tensors(lora: bool) -> dict[str, np.ndarray]:
    out = {f"b{i}.w": np.ones(BASE, np.float32) for i in range(3)}
    if lora:
        out |= {f"b{i}.lora_{ab}": np.zeros(ADAPTER, np.float32) for i in range(3) for ab in "AB"}
    return out


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_after_the_first_receipt_only_adapters_travel(mode: str) -> None:
    lora = hop_payloads(snake_plan(["a", "b", "c"], groups(True), 2, mode), tensors(True))
    full = hop_payloads(snake_plan(["a", "b", "c"], groups(False), 2, mode), tensors(False))
    later = [h for h in lora if not h["receiver_held_nothing"]]
    assert later and all(FROZEN_GROUP not in h["sent_groups"] for h in later)
    assert max(h["bytes_out"] for h in later) < 3 * 2 * ADAPTER * 4 + 2048  # adapters and the header, no base
    fresh = [h for h in lora if h["receiver_held_nothing"]]
    assert all(FROZEN_GROUP in h["sent_groups"] and h["bytes_out"] > 3 * BASE * 4 for h in fresh)
    if mode == "cs":  # the coordinator holds everything: even the first uplink carries only adapters
        assert not fresh and all(h["bytes_in"] > 3 * BASE * 4 for h in lora if h["round"] == 0)
    assert sum(h["bytes_out"] for h in lora) < sum(h["bytes_out"] for h in full)
