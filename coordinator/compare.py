"""``compare``: run every algorithm x partition combination as a simulated trial and report.

An algorithm may carry variants: ``snake+kd`` (knowledge distillation: the trial's ``kd_alpha``, or
``DEFAULT_KD_ALPHA`` when the trial has none), ``snake+fp16`` (fp16 transfers), ``snake+kd+fp16``,
``snake+noskew`` (no label-skew methods: ``label_skew = off``, the default before they existed).
With several seeds every combination runs once per seed and the report adds medians over seeds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.config import TrialConfig
from coordinator.errors import CoordinatorError
from coordinator.report import write_report
from coordinator.simulate import SimOptions, simulate
from edge_agent.data import DataError, parse_partition

log = logging.getLogger(__name__)
ALGORITHMS = ("snake", "fedavg", "fedprox", "split")
VARIANTS = ("kd", "fp16", "noskew")
DEFAULT_KD_ALPHA = 4.0  # examples/noniid-kd.toml: cnn, Dirichlet(0.1), 0.319 -> 0.540 test accuracy


def variant(config: TrialConfig, spec: str) -> TrialConfig:
    """``config`` for one compared run: ``ALGORITHM[+kd][+fp16]``."""
    algorithm, *flags = spec.strip().split("+")
    if algorithm not in ALGORITHMS:
        raise CoordinatorError(f"unknown algorithm {algorithm!r} in {spec!r}; use one of {', '.join(ALGORITHMS)}")
    unknown = [f for f in flags if f not in VARIANTS]
    if unknown or len(set(flags)) != len(flags):
        raise CoordinatorError(f"bad variant in {spec!r}; an algorithm takes +kd, +fp16, +noskew once each")
    train, transfer = config.train, config.transfer
    if "kd" in flags:
        train = dataclasses.replace(train, kd_alpha=train.kd_alpha or DEFAULT_KD_ALPHA)
    elif config.train.kd_alpha:  # plain "snake" next to "snake+kd" means without distillation
        train = dataclasses.replace(train, kd_alpha=0.0)
    if "noskew" in flags:
        train = dataclasses.replace(train, label_skew="off")
    if "fp16" in flags:
        transfer = dataclasses.replace(transfer, compression="fp16")
    return dataclasses.replace(config, algorithm=algorithm, train=train, transfer=transfer)


def compare(
    config: TrialConfig, algorithms: Sequence[str], partitions: Sequence[str], out: Path, options: SimOptions,
    target: float, seeds: Sequence[int] = (),
) -> dict[str, Any]:  # fmt: skip
    """Every algorithm x partition (x seed: ``seeds``, default the trial's own) as a simulated trial; the report."""
    for part in partitions:
        parse_partition(part)  # fail before running anything
    runs = {spec: variant(config, spec) for spec in algorithms}
    for cfg in runs.values():  # every combination's config is valid before anything runs
        for part in partitions:
            dataclasses.replace(cfg, partition=part).validate()
    summaries = []
    for seed in seeds or (config.seed,):
        for spec, cfg in runs.items():
            for part in partitions:
                run = dataclasses.replace(cfg, partition=part, eval_every_round=True, seed=seed).validate()
                name = f"{spec.replace('+', '-')}-{part.replace(':', '')}" + (f"-s{seed}" if seeds else "")
                log.info("compare: %s on %s partitions, seed %d -> %s", spec, part, seed, out / name)
                try:
                    summary = simulate(run, out / name, options)
                except (CoordinatorError, DataError) as exc:
                    log.error("compare: %s / %s (seed %d) failed: %s", spec, part, seed, exc)
                    summary = {"algorithm": cfg.algorithm, "partition": part, "failed": str(exc)}
                summaries.append({**summary, "variant": spec, "seed": seed})
    title = f"{config.model} on {config.dataset}: {config.agents} agents, {config.rounds} rounds"
    if seeds:
        title += f", seeds {', '.join(map(str, seeds))}"
    return write_report(summaries, out, target, title)
