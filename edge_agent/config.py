"""Typed agent configuration, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    broker: str  # mqtt://host:port (password redacted when printed)
    data: str  # dataset spec: fashion-mnist[:DIR] | cifar10:DIR | npz:FILE (images or tokens, edge_agent.textdata)
    partition: str | None = None  # iid | dirichlet:ALPHA | by-source; None = use the data set as given
    part: tuple[int, int] = (0, 1)  # (index, count) of the partition this agent takes
    seed: int = 0  # partition and shuffling seed
    samples: int = 0  # cap on local training samples (0 = all)
    val_fraction: float = 0.1  # local validation split when partitioning
    cache_dir: Path = Path.home() / ".cache" / "snakelearn"
    backend: str = "auto"  # auto | ort | portable
    threads: int = 0  # intra-op threads (0 = runtime default)
    memory_budget_mb: int = 0  # 0 = physical memory, or the cgroup's limit if smaller
    calibrate: bool = True  # measure GFLOP/s at start (edge_agent.calibrate) for the planner
    map_large_allocations: bool = True  # glibc: allocations >= 1 MiB get their own mapping (less peak memory)
    connect_timeout_s: float = 30.0  # give up if the broker does not answer
    username: str | None = None  # broker user name when the URL has none
    password_file: Path | None = None  # broker password, read at connect time (never kept in config or logs)
    tls_ca: Path | None = None  # CA that signed the broker's certificate (mqtts://)
    tls_cert: Path | None = None  # this agent's client certificate (a provisioned broker requires it)
    tls_key: Path | None = None  # its private key (mode 0600)
    signing_key: Path | None = None  # Ed25519 key this agent signs its messages with (edge_agent.keys)
    trust_dir: Path | None = None  # NAME.pub keys of the participants whose signed messages it accepts
    tick_s: float = 1.0  # how often timers run
    progress_every_s: float = 1.0  # hop_progress rate limit
