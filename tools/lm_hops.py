"""Snake Learning of the GPT on Jane Austen, in one process, without a broker: the hops a language-model
trial will make, while the trial wiring (coordinator/trial.py, simulate) does not take token data yet.

Each agent holds its share of the novels (``--partition by-source``: whole novels); the layer groups are
cut into one contiguous segment per agent; in every round the model visits the agents in order and each
trains only its segment (ORT on-device training artifacts built per segment) on its own sequences, then
hands the weights on. Prints the test perplexity (exp of the mean next-token loss) before and after, as
JSON on stdout.

    PYTHONPATH=$PWD .venv/bin/python tools/lm_hops.py --agents 4 --rounds 1 --steps 50
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from coordinator.build.artifacts import build_segment_artifacts
from coordinator.export import TASK_CAUSAL_LM, export_forward
from coordinator.lora import LoraSettings, add_adapters, is_adapter
from coordinator.text.sequences import austen_tokens
from edge_agent.data import parse_partition, partition
from edge_agent.ort_trainer import OrtTrainer
from edge_agent.textdata import lm_pairs
from edge_agent.trainer import TrainSpec
from models import InputSpec, build_model


def _segments(groups: list[str], count: int) -> list[list[str]]:
    """``groups`` cut into ``count`` contiguous runs, as equal as possible."""
    return [list(part) for part in np.array_split(np.array(groups, dtype=object), count)]


@click.command()
@click.option("--agents", default=4, show_default=True, help="Agents (and segments).")
@click.option("--rounds", default=1, show_default=True, help="Passes of the model over all agents.")
@click.option("--steps", default=50, show_default=True, help="Optimizer steps per hop.")
@click.option("--batch-size", default=16, show_default=True, help="Sequences per step.")
@click.option("--lr", default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--seq-len", default=64, show_default=True, help="Tokens per sequence.")
@click.option("--partition", "partition_spec", default="by-source", show_default=True, help="iid or by-source.")
@click.option("--test-sequences", default=1000, show_default=True, help="Test sequences evaluated (spread evenly).")
@click.option("--threads", default=2, show_default=True, help="ORT intra-op threads.")
@click.option("--seed", default=0, show_default=True, help="Model, partition and shuffling seed.")
@click.option(
    "--pretrain-steps",
    default=0,
    show_default=True,
    help="First train a base: every non-adapter "
    "parameter on the whole train split for this many steps (0 = start from the random init).",
)
@click.option(
    "--lora-rank", default=0, show_default=True, help="LoRA: segments train only adapters of this rank (0 = off)."
)
@click.option("--lora-alpha", default=16.0, show_default=True, help="LoRA scale numerator (scale = alpha / rank).")
def main(
    agents: int,
    rounds: int,
    steps: int,
    batch_size: int,
    lr: float,
    seq_len: int,
    partition_spec: str,
    test_sequences: int,
    threads: int,
    seed: int,
    pretrain_steps: int,
    lora_rank: int,
    lora_alpha: float,
) -> None:
    import torch

    ds = austen_tokens(seq_len)
    parts = partition(ds.y_train, agents, parse_partition(partition_spec), seed=seed, min_size=1)
    pick = np.linspace(0, len(ds.x_test) - 1, min(test_sequences, len(ds.x_test))).astype(np.int64)
    x_test, y_test = lm_pairs(ds.x_test[pick], ds.pad_id)
    torch.manual_seed(seed)
    model = build_model("gpt", InputSpec(num_classes=ds.vocab_size, seq_len=seq_len))
    if lora_rank:
        add_adapters(model, LoraSettings(rank=lora_rank, alpha=lora_alpha))
    work = Path(tempfile.mkdtemp(prefix="lm-hops-"))
    forward = export_forward(model, (seq_len,), ds.vocab_size, work / "export", TASK_CAUSAL_LM)
    trained = [g.name for g in forward.groups if not lora_rank or any(is_adapter(p) for p in g.params)]
    segments = _segments(trained, agents)

    def trainable(groups: list[str]) -> tuple[str, ...]:
        return tuple(p for p in forward.params_of(groups) if not lora_rank or is_adapter(p))

    weights, hops = dict(forward.tensors), []
    trainer = OrtTrainer(threads=threads)

    def perplexity() -> float:
        return math.exp(trainer.evaluate(x_test, y_test, 64).loss)

    def per_source() -> dict[str, float]:
        sources = ds.y_test[pick]
        return {ds.sources[s]: round(math.exp(trainer.evaluate(x_test[sources == s], y_test[sources == s], 64).loss), 3)
                for s in sorted(set(sources.tolist()))}  # fmt: skip

    if pretrain_steps:
        base = tuple(p for p in forward.params_of([g.name for g in forward.groups]) if not is_adapter(p))
        trainer.open(build_segment_artifacts(forward, base, work / "artifacts").directory)
        trainer.set_weights(weights)
        x, y = lm_pairs(ds.x_train, ds.pad_id)
        trainer.train(x, y, TrainSpec(epochs=1, batch_size=batch_size, lr=lr, max_steps=pretrain_steps, seed=seed))
        weights = trainer.get_weights()
    base_per_source = per_source() if pretrain_steps else {}

    for r in range(rounds):
        for k, segment in enumerate(segments):
            bundle = build_segment_artifacts(forward, trainable(segment), work / "artifacts")
            trainer.open(bundle.directory)
            trainer.set_weights(weights)
            before = perplexity() if not hops else hops[-1]["test_perplexity"]
            x, y = lm_pairs(ds.x_train[parts[k]], ds.pad_id)
            started = time.perf_counter()
            spec = TrainSpec(epochs=1, batch_size=batch_size, lr=lr, max_steps=steps, seed=seed + r)
            stats = trainer.train(x, y, spec)
            weights = trainer.get_weights()
            sources = sorted({ds.sources[s] for s in ds.y_train[parts[k]]})
            hops.append({"round": r, "agent": k, "segment": segment, "sources": sources, "train_loss": stats.loss,
                         "trainable_params": int(sum(forward.tensors[n].size for n in trainable(segment))),
                         "seconds": round(time.perf_counter() - started, 2), "test_perplexity_before": before,
                         "test_perplexity": perplexity()})  # fmt: skip
            print(f"round {r} agent {k} {segment}: perplexity {before:.1f} -> {hops[-1]['test_perplexity']:.1f}",
                  file=sys.stderr)  # fmt: skip
    params = sum(v.size for v in forward.tensors.values())
    summary = {"params": int(params), "lora_rank": lora_rank, "lora_alpha": lora_alpha if lora_rank else None,
               "sequences": {"train": len(ds.x_train), "test_evaluated": len(pick)},
               "perplexity_before": hops[0]["test_perplexity_before"], "perplexity_after": hops[-1]["test_perplexity"],
               "pretrain_steps": pretrain_steps, "hops": hops}  # fmt: skip
    if pretrain_steps:
        summary["per_source"] = {
            k: {"base": v, "final": p} for (k, v), p in zip(base_per_source.items(), per_source().values(), strict=True)
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
