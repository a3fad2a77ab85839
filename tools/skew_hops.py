"""A snake trial's hops in one process with real ONNX Runtime training and no broker: screening label-skew
settings fast. Same partitions as ``simulate`` (:func:`coordinator.partitions.shares`), same seeded model and
export (:func:`coordinator.prepare.prepare`), the planner's plan for the fleet (with each agent's label
histogram), the same per-hop settings (:func:`coordinator.skew.hop_settings`) and the agent's hop function
(:func:`edge_agent.bnstats.mix_running_stats` after training). Not the trial itself: no transfers, no faults;
test accuracy is the eval graph's on the whole test set after every round. JSON on stdout.

    PYTHONPATH=$PWD .venv/bin/python tools/skew_hops.py --partition dirichlet:0.1 --seed 0 --label-skew on
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from coordinator.build.artifacts import build_segment_artifacts
from coordinator.config import TrainConfig, TrialConfig
from coordinator.partitions import shares
from coordinator.prepare import make_plan, prepare
from coordinator.skew import decide
from coordinator.trial import input_spec
from edge_agent.bnstats import mix_running_stats, mixed_buffers
from edge_agent.data import load_dataset, split_holdout
from edge_agent.ort_trainer import OrtTrainer
from edge_agent.trainer import TrainSpec


@click.command()
@click.option("--partition", default="dirichlet:0.3", show_default=True)
@click.option("--agents", default=4, show_default=True)
@click.option("--rounds", default=4, show_default=True)
@click.option("--samples-per-agent", default=3000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--label-skew", default="auto", show_default=True, help="auto | on | off")
@click.option("--kd-alpha", type=float, help="Override the distillation weight.")
@click.option("--logit-adjust", type=float, help="Override the logit adjustment tau.")
@click.option("--bn-mix", type=float, help="Override the BatchNorm statistics mixing weight.")
@click.option(
    "--balanced-head/--rotate-head",
    default=False,
    show_default=True,
    help="train.balanced_head: the last hop to the agent closest to the fleet's label mix.",
)
@click.option("--threads", default=1, show_default=True)
def main(partition: str, agents: int, rounds: int, samples_per_agent: int, seed: int, label_skew: str,
         kd_alpha: float | None, logit_adjust: float | None, bn_mix: float | None, balanced_head: bool,
         threads: int) -> None:  # fmt: skip
    train = TrainConfig(label_skew=label_skew, balanced_head=balanced_head)
    config = TrialConfig(partition=partition, agents=agents, rounds=rounds, seed=seed, train=train,
                         samples_per_agent=samples_per_agent).validate()  # fmt: skip
    ds = load_dataset(config.dataset)
    data = []
    for i, idx in enumerate(shares(config, ds.y_train)):
        x, y, _, _ = split_holdout(ds.x_train[idx], ds.y_train[idx], config.val_fraction, seed=config.seed + i)
        data.append((x, y))
    work = Path(tempfile.mkdtemp(prefix="skew-hops-"))
    prepared = prepare(config, input_spec(ds), work)
    histograms = {f"agent-{i}": np.bincount(y, minlength=ds.num_classes).tolist() for i, (_, y) in enumerate(data)}
    plan = make_plan(config, prepared.groups, list(histograms), histograms)
    methods = decide(config.train, histograms)
    methods = dataclasses.replace(
        methods,
        kd_alpha=methods.kd_alpha if kd_alpha is None else kd_alpha,
        logit_adjust=methods.logit_adjust if logit_adjust is None else logit_adjust,
        bn_mix=methods.bn_mix if bn_mix is None else bn_mix,
    )
    print(f"{methods.describe()}", file=sys.stderr)
    weights = dict(prepared.forward.tensors)
    trainer, rows, started = OrtTrainer(threads=threads), [], time.perf_counter()
    for h in plan.hops:
        seg = plan.segments[h.segment]
        bundle = build_segment_artifacts(prepared.forward, seg.params, work / "artifacts", kd=True)
        trainer.open(bundle.directory)
        trainer.set_weights(weights)
        x, y = data[int(h.agent.split("-")[1])]
        spec = TrainSpec(seed=config.seed + h.hop, kd_alpha=methods.kd_alpha, kd_temperature=2.0,
                         logit_adjust=methods.logit_adjust)  # fmt: skip
        trainer.train(x, y, spec)
        weights = mix_running_stats(weights, trainer.get_weights(), mixed_buffers(trainer.manifest), methods.bn_mix)
        if h.hop + 1 == len(plan.hops) or plan.hops[h.hop + 1].round != h.round:
            trainer.set_weights(weights)
            test = trainer.evaluate(ds.x_test, ds.y_test, 500)
            rows.append(round(test.accuracy, 4))
            print(f"round {h.round}: {test.accuracy:.4f}", file=sys.stderr)
    print(json.dumps({"partition": partition, "seed": seed, "agents": agents, "methods": dataclasses.asdict(methods),
                      "balanced_head": balanced_head,
                      "route": [f"{h.agent}:s{h.segment}" for h in plan.hops], "round_accuracy": rows, "wall_s": round(time.perf_counter() - started, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
