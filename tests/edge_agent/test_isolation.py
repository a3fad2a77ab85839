"""The agent runs on boards without torch: importing all of edge_agent must not load it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import edge_agent
    names = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.")]
    for name in names:
        importlib.import_module(name)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "coordinator", "models"))
    print(len(names), bad)
    sys.exit(1 if bad else 0)
    """
)


def test_importing_every_edge_agent_module_loads_no_torch_coordinator_or_models() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = int(proc.stdout.split()[0])
    assert count >= 15  # every module was really imported (protocol, trainer, service, cli, ...)
