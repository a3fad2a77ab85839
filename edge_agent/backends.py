"""Trainer backends by name; the agent picks one that is installed."""

from __future__ import annotations

import importlib.util

from edge_agent.errors import EdgeAgentError
from edge_agent.trainer import Trainer

BACKENDS = ("ort",)


class BackendError(EdgeAgentError):
    """The requested backend is unknown or not installed."""


def installed() -> list[str]:
    """Backends whose runtime is importable here (``import`` not attempted: cheap)."""
    return ["ort"] if importlib.util.find_spec("onnxruntime") is not None else []


def make_trainer(name: str, threads: int = 0) -> Trainer:
    if name == "auto":
        have = installed()
        if not have:
            raise BackendError("no trainer backend installed: pip install 'snakelearn[agent]'")
        name = have[0]
    if name == "ort":
        from edge_agent.ort_trainer import OrtTrainer

        return OrtTrainer(threads=threads)
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
