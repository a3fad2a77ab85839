"""Hard memory caps for simulated agents: one Linux cgroup per capped agent process.

A cap emulates a small board: the kernel charges every page the agent touches to its cgroup
and kills the process (OOM) when it goes over, so an agent that cannot hold its work really
fails. The agent reads its own cgroup's limit and reports it as its memory budget
(``edge_agent.profile.memory_budget_mb``), so the planner sees the cap as it would see a Pi's RAM.

Works with cgroup v1 (``/sys/fs/cgroup/memory``) or v2 (``memory.max``) where this process may
create child cgroups (root, or a delegated subtree). Elsewhere :func:`available` says why and
simulate refuses a capped fleet with that reason rather than running it uncapped.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from coordinator.errors import ConfigError

log = logging.getLogger(__name__)
ROOT = Path("/sys/fs/cgroup")


def _own_cgroup() -> tuple[str, Path] | None:
    """("v1" | "v2", the directory of this process's memory cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", ROOT / "memory" / path.lstrip("/")
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (ROOT / "cgroup.controllers").is_file():
            return "v2", ROOT / path.lstrip("/")
    return None


class MemoryCap:
    """A cgroup limited to ``limit_mb`` MiB for one agent process. ``wrap`` a command to run in it."""

    def __init__(self, name: str, limit_mb: int) -> None:
        found = _own_cgroup()
        if found is None:
            raise ConfigError("memory caps need a cgroup memory controller (none found in /proc/self/cgroup)")
        self.version, parent = found
        self.limit_mb = limit_mb
        self.path = parent / f"snakelearn-{name}-{os.getpid()}"
        limit = str(limit_mb << 20)
        try:
            self.path.mkdir(exist_ok=True)
            if self.version == "v1":
                (self.path / "memory.limit_in_bytes").write_text(limit)
                try:  # no swap either, where swap is accounted
                    (self.path / "memory.memsw.limit_in_bytes").write_text(limit)
                except OSError:
                    pass
            else:
                (self.path / "memory.max").write_text(limit)
                try:
                    (self.path / "memory.swap.max").write_text("0")
                except OSError:
                    pass
        except OSError as exc:
            self.remove()
            raise ConfigError(
                f"cannot create a memory cgroup under {parent} ({exc}); memory caps need root or a delegated "
                "cgroup subtree"
            ) from exc

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run inside the cgroup: a shell joins it, then execs (no pre-exec hooks, no race)."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "snakelearn-cap", *command]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this cgroup for going over the cap."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        try:  # older v1 kernels: the limit was hit at least once
            return int((self.path / "memory.failcnt").read_text().strip()) > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            if self.path.exists():
                log.warning("could not remove cgroup %s: %s", self.path, exc)


def available() -> str | None:
    """None if memory caps work here, else why not."""
    try:
        probe = MemoryCap("probe", 64)
    except ConfigError as exc:
        return str(exc)
    probe.remove()
    return None
