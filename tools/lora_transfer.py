"""What LoRA changes in a snake trial of the GPT: trainable parameters per segment and the bytes every
hand-off carries, with and without LoRA, as JSON on stdout.

The trial is prepared as ``simulate`` prepares it (model, forward export, layer groups, the planner's
plan for ``--agents`` identical agents); each hop's payload is encoded by the agents' own code path
(:func:`edge_agent.protocol.delta.encode_model` over the plan's versioned layout, sending the groups the
receiver lacks per :meth:`coordinator.plan.Plan.held_by`), so the sizes are the bytes a real hand-off
puts on the wire before chunking. Weights do not change sizes, so the exported values stand in for
trained ones.

    PYTHONPATH=$PWD .venv/bin/python tools/lora_transfer.py --agents 4 --rounds 2 --rank 8
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from coordinator.config import load_trial
from coordinator.plan import AgentProfile, Plan
from coordinator.prepare import make_plan, prepare
from edge_agent.protocol.delta import digests_of, encode_model, newer
from models import InputSpec


def hop_payloads(plan: Plan, tensors: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per hop, what its agent hands on: to the next agent (P2P, the last hop to the coordinator) or back
    to the coordinator (client-server), and for client-server what the coordinator sends the hop first."""
    layout = plan.groups()
    digests = digests_of(tensors, layout)
    rows = []
    for h in plan.hops:
        versions = plan.versions_after(h.hop)
        if plan.mode == "cs":
            holds = plan.versions_after(h.hop - 1)  # the coordinator holds what it sent
        else:
            holds = plan.held_by(h.hop + 1) if h.hop + 1 < len(plan.hops) else plan.versions_after(-1)
        send = newer(versions, holds) if layout else list(layout)
        out = len(encode_model(tensors, layout, versions, digests, send))
        row: dict[str, Any] = {"hop": h.hop, "round": h.round, "agent": h.agent, "segment": h.segment}
        row |= {"sent_groups": send, "bytes_out": out, "receiver_held_nothing": not holds}
        row["to"] = "coordinator" if plan.mode == "cs" or h.hop + 1 == len(plan.hops) else plan.hops[h.hop + 1].agent
        if plan.mode == "cs":
            before = plan.versions_after(h.hop - 1)
            down = newer(before, plan.held_by(h.hop)) if layout else list(layout)
            row["bytes_in"] = len(encode_model(tensors, layout, before, digests, down))
        rows.append(row)
    return rows


def figures(rank: int, alpha: float, targets: str, agents: int, rounds: int, mode: str, seq_len: int) -> dict[str, Any]:
    """One variant (``rank`` 0: without LoRA): parameters, segments and per-hop bytes."""
    overrides = {"model": "gpt", "agents": agents, "rounds": rounds, "mode": mode}
    config = load_trial(None, overrides | {"lora.rank": rank, "lora.alpha": alpha, "lora.targets": targets})
    with tempfile.TemporaryDirectory(prefix="lora-transfer-") as work:
        prepared = prepare(config, InputSpec(num_classes=259, seq_len=seq_len), Path(work))
    plan = make_plan(config, prepared.groups, [AgentProfile(f"agent-{i}") for i in range(agents)])
    tensors = prepared.forward.tensors
    hops = hop_payloads(plan, tensors)
    fresh = [h["bytes_out"] for h in hops if h["receiver_held_nothing"]]
    later = [h["bytes_out"] for h in hops if not h["receiver_held_nothing"]]
    return {
        "lora": config.lora.as_dict() if rank else None,
        "model_params": int(sum(t.size for t in tensors.values())),
        "model_bytes": int(sum(t.nbytes for t in tensors.values())),
        "trainable_params": int(sum(g.num_params for g in prepared.groups)),
        "segments": [{"groups": list(s.groups), "trainable_params": s.num_params} for s in plan.segments],
        "hops": hops,
        "bytes_to_fresh_receiver_median": statistics.median(fresh) if fresh else None,
        "bytes_to_holding_receiver_median": statistics.median(later) if later else None,
        "bytes_total": sum(h["bytes_out"] + h.get("bytes_in", 0) for h in hops),
    }


@click.command()
@click.option("--agents", default=4, show_default=True, help="Identical agents in the plan.")
@click.option("--rounds", default=2, show_default=True, help="Rounds (from round 2 on, receivers hold a copy).")
@click.option("--mode", type=click.Choice(["p2p", "cs"]), default="p2p", show_default=True, help="Hand-off mode.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank of the LoRA variant.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--targets", default="", help="Comma-separated projections ('' = every projection of the blocks).")
@click.option("--seq-len", default=64, show_default=True, help="Tokens per sequence (the GPT's block size).")
def main(agents: int, rounds: int, mode: str, rank: int, alpha: float, targets: str, seq_len: int) -> None:
    if rank < 1:
        raise click.BadParameter("the LoRA variant needs a rank >= 1", param_hint="--rank")
    full = figures(0, alpha, "", agents, rounds, mode, seq_len)
    lora = figures(rank, alpha, targets, agents, rounds, mode, seq_len)
    later_full, later_lora = full["bytes_to_holding_receiver_median"], lora["bytes_to_holding_receiver_median"]
    result = {
        "model": "gpt",
        "agents": agents,
        "rounds": rounds,
        "mode": mode,
        "without_lora": full,
        "with_lora": lora,
        "ratio_trainable": lora["trainable_params"] / full["trainable_params"],
        "ratio_bytes_to_holding_receiver": later_lora / later_full if later_full and later_lora else None,
        "ratio_bytes_total": lora["bytes_total"] / full["bytes_total"],
    }
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
