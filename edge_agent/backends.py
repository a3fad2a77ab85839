"""Trainer backends by name; the agent picks one that is installed.

``ort`` needs onnxruntime-training (its on-device training API); ``portable`` needs
any onnxruntime build (plain ``onnxruntime`` ships for every board and Python; the
training build runs its graphs too). Availability is read off the installed files:
nothing is imported, so asking is cheap and never imports torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import EdgeAgentError
from edge_agent.trainer import Trainer, TrainerError

if TYPE_CHECKING:
    from edge_agent.hop import FrontTrainer

BACKENDS = ("ort", "portable")


class BackendError(EdgeAgentError):
    """The requested backend is unknown or not installed."""


def _onnxruntime_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed() -> list[str]:
    """Backends whose runtime is installed here, preferred first (``auto`` takes the first)."""
    root = _onnxruntime_dir()
    if root is None:
        return []
    has_training = (root / "training" / "api").is_dir()
    return ["ort", "portable"] if has_training else ["portable"]


def make_trainer(name: str, threads: int = 0) -> Trainer:
    if name == "auto":
        have = installed()
        if not have:
            raise BackendError(
                "no trainer backend installed: pip install 'snakelearn[agent]' or 'snakelearn[agent-portable]'"
            )
        name = have[0]
    if name == "ort":
        from edge_agent.ort_trainer import OrtTrainer

        return OrtTrainer(threads=threads)
    if name == "portable":
        from edge_agent.portable_trainer import PortableTrainer

        return PortableTrainer(threads=threads)
    raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


class BackendTrainers:
    """Fresh trainers of one installed backend, one per hop (``edge_agent.hop.Trainers``)."""

    def __init__(self, name: str, threads: int = 0) -> None:
        self.threads = threads
        self.backend = make_trainer(name, threads).backend  # resolves "auto"; fails early if none is installed

    def make(self) -> Trainer:
        return make_trainer(self.backend, self.threads)

    def make_front(self) -> FrontTrainer:
        if self.backend != "ort":
            raise TrainerError(f"split learning needs the ort backend; this agent runs {self.backend}")
        from edge_agent.split_trainer import OrtFrontTrainer

        return OrtFrontTrainer(self.threads)
