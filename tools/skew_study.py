"""The label-skew convergence study: ``compare`` runs (real agent processes, broker, ONNX Runtime) of snake
with its label-skew defaults, snake without them (``snake+noskew``), FedAvg and FedProx, per agent count, on
IID and Dirichlet partitions, several seeds, evaluated every round. Each agent count gets its own compare
directory (``report.md`` with a per-seed table, medians over seeds, ratios; ``accuracy_rounds.png``,
``accuracy_bytes.png``); ``study.json`` collects the over-seed rows of all of them.

    # the whole study (hours on 2 cores)
    PYTHONPATH=$PWD .venv/bin/python tools/skew_study.py --out docs/results/skew/full
    # the acceptance comparison (4 agents, 4 rounds, 3 seeds)
    PYTHONPATH=$PWD .venv/bin/python tools/skew_study.py --out DIR --agents 4 --rounds 4 \
        --algorithms snake,fedavg --partitions iid,dirichlet:0.3,dirichlet:0.1
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from coordinator.compare import compare
from coordinator.config import load_trial
from coordinator.simulate import SimOptions


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Study directory.")
@click.option("--agents", default="4,8", show_default=True, help="Comma-separated agent counts.")
@click.option("--rounds", default=20, show_default=True, help="Rounds per trial (until the curves flatten).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--algorithms", default="snake,snake+noskew,fedavg,fedprox", show_default=True)
@click.option("--partitions", default="iid,dirichlet:1.0,dirichlet:0.3,dirichlet:0.1", show_default=True)
@click.option("--samples-per-agent", default=3000, show_default=True)
@click.option("--target", default=0.8, show_default=True, help="Accuracy for rounds and MB to target.")
@click.option("--model", default="cnn", show_default=True)
def main(out: Path, agents: str, rounds: int, seeds: str, algorithms: str, partitions: str,
         samples_per_agent: int, target: float, model: str) -> None:  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seed_list = [int(s) for s in seeds.split(",")]
    study = {"command": {"agents": agents, "rounds": rounds, "seeds": seed_list, "algorithms": algorithms,
                         "partitions": partitions, "samples_per_agent": samples_per_agent, "model": model},
             "over_seeds": {}, "ratios": {}}  # fmt: skip
    for count in (int(a) for a in agents.split(",")):
        config = load_trial(None, {"agents": count, "rounds": rounds, "samples_per_agent": samples_per_agent,
                                   "model": model})  # fmt: skip
        result = compare(config, algorithms.split(","), partitions.split(","), out / f"agents-{count}",
                         SimOptions(None, "auto", (), 0, show_progress=False), target, seed_list)  # fmt: skip
        study["over_seeds"][str(count)] = result["over_seeds"]
        study["ratios"][str(count)] = result["ratios"]
        (out / "study.json").write_text(json.dumps(study, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
