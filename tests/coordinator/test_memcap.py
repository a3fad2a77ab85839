"""Memory caps for simulated agents are real: a process over its cgroup's limit is killed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from coordinator import memcap
from edge_agent.profile import cgroup_memory_limit_mb
from tests.capped import require_memcap


@pytest.fixture
def cap() -> Iterator[memcap.MemoryCap]:
    require_memcap()
    made = memcap.MemoryCap("test", 128)
    yield made
    made.remove()


def test_a_process_over_its_cap_is_killed_and_one_within_it_runs(cap: memcap.MemoryCap) -> None:
    sees = "from edge_agent.profile import memory_budget_mb; print(memory_budget_mb())"
    within = subprocess.run(cap.wrap([sys.executable, "-c", sees]), capture_output=True, text=True, timeout=60)
    assert within.returncode == 0 and within.stdout.strip() == "128"  # the agent reports its cap as its budget
    assert not cap.oom_killed()
    grab = "import numpy as np; a = np.ones(400 << 20, np.uint8); print(a.sum())"  # 400 MiB, touched
    over = subprocess.run(cap.wrap([sys.executable, "-c", grab]), capture_output=True, timeout=60)
    assert over.returncode == -9 and cap.oom_killed()


def test_cgroup_limits_are_read_for_both_hierarchies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "memory" / "a").mkdir(parents=True)
    (tmp_path / "memory" / "a" / "memory.limit_in_bytes").write_text(str(300 << 20))
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/a\n0::/\n")
    assert cgroup_memory_limit_mb(str(proc), str(tmp_path)) == 300
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "memory.max").write_text("max\n")
    proc.write_text("0::/b\n")
    assert cgroup_memory_limit_mb(str(proc), str(tmp_path)) is None  # v2 without a limit
    (tmp_path / "b" / "memory.max").write_text(str(64 << 20))
    assert cgroup_memory_limit_mb(str(proc), str(tmp_path)) == 64
