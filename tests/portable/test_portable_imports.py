"""Every edge_agent module imports where the portable agent runs: plain onnxruntime, no onnx, no torch,
no onnxruntime-training (``ort_training`` imports that lazily: importing it works, using it says why not)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import edge_agent
    names = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.")]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {exc!r}")
    heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "coordinator", "models")})
    print(len(names), heavy, failed)
    sys.exit(1 if failed or heavy else 0)
    """
)


def test_every_agent_module_imports_without_onnx_torch_or_the_training_build() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[0]) >= 25  # every module was really walked (protocol, trainers, service, cli, ...)
