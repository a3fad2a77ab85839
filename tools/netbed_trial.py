"""A whole trial on the network test bed (tools/netbed.py): mosquitto on the broker host, the agents
on their hosts behind their links, the coordinator on its host, each a real process.

The agents' data partitions are written the way ``simulate`` writes them (coordinator.partitions),
agents start through ``simulate``'s ``AgentProcesses`` (prefixed with ``ip netns exec``), and the
coordinator runs ``python -m coordinator.cli run TRIAL --broker URL --stop-agents``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tools.netbed import NetBed, NetBedError
from tools.netbed_links import LinkSpec

log = logging.getLogger("netbed")


def run_trial(
    trial: Path, links: dict[int, LinkSpec], out: Path, backend: str = "auto", timeout_s: float = 900.0
) -> dict[str, Any]:
    """Run ``trial`` with ``links`` (agent index -> link); returns the coordinator's summary plus
    ``netbed`` (wall time, links as set and as measured). Raises NetBedError if anything fails."""
    from coordinator.config import load_trial
    from coordinator.partitions import write_partitions
    from coordinator.simulate import AgentProcesses
    from edge_agent.data import load_dataset

    config = load_trial(trial)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_partitions(config, load_dataset(config.dataset), out / "data")
    agents = AgentProcesses()
    with NetBed(config.agents, links, logdir=out / "logs") as bed:
        try:
            url = bed.start_broker()
            for i, path in enumerate(paths):
                member = config.member(i)
                agents.spawn(f"agent-{i}", bed.broker_url_for(i, url), path, out, member.backend or backend,
                             member.threads, member.memory_mb, prefix=bed.exec_prefix(f"agent{i}"))  # fmt: skip
            started = time.monotonic()
            cmd = [sys.executable, "-m", "coordinator.cli", "run", str(trial.resolve()), "--broker", url,
                   "--stop-agents", "--out", str(out.resolve())]  # fmt: skip
            coordinator = bed.spawn("coordinator", "coord", cmd, out / "logs" / "coordinator.log")
            code = _wait(coordinator, agents, started + timeout_s)
            wall_s = time.monotonic() - started
            measured = bed.link_stats()
            agents.stop(grace_s=15.0 if code == 0 else 0.0)
        except BaseException:
            agents.stop(grace_s=0.0)
            raise
    if code != 0:
        tail = (out / "logs" / "coordinator.log").read_text(errors="replace").splitlines()[-8:]
        raise NetBedError(
            f"the coordinator exited with {code}; {out}/logs/coordinator.log ends:\n  " + "\n  ".join(tail)
        )
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["netbed"] = {
        "wall_s": round(wall_s, 1),
        "links": {f"agent-{i}": vars(spec) for i, spec in links.items()},
        "measured": measured,
    }
    (out / "netbed.json").write_text(json.dumps(summary["netbed"], indent=2))
    return summary


def _wait(coordinator: Any, agents: Any, deadline: float) -> int:
    """The coordinator's exit code; raises if an agent crashes or time runs out first."""
    while (code := coordinator.poll()) is None:
        crash = agents.crashed()
        if crash:
            raise NetBedError(crash)
        if time.monotonic() > deadline:
            raise NetBedError("the trial did not finish in time")
        time.sleep(0.5)
    return int(code)
