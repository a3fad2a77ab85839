"""``compare``: run every algorithm x partition combination as a simulated trial and report."""

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


def compare(
    config: TrialConfig, algorithms: Sequence[str], partitions: Sequence[str], out: Path, options: SimOptions,
    target: float,
) -> dict[str, Any]:  # fmt: skip
    for part in partitions:
        parse_partition(part)  # fail before running anything
    summaries = []
    for algorithm in algorithms:
        for part in partitions:
            run = dataclasses.replace(config, algorithm=algorithm, partition=part, eval_every_round=True).validate()
            run_dir = out / f"{algorithm}-{part.replace(':', '')}"
            log.info("compare: %s on %s partitions -> %s", algorithm, part, run_dir)
            try:
                summaries.append(simulate(run, run_dir, options))
            except (CoordinatorError, DataError) as exc:
                log.error("compare: %s / %s failed: %s", algorithm, part, exc)
                summaries.append({"algorithm": algorithm, "partition": part, "failed": str(exc)})
    title = f"{config.model} on {config.dataset}: {config.agents} agents, {config.rounds} rounds"
    return write_report(summaries, out, target, title)
