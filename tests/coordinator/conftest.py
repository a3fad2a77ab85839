"""Session-scoped exports of the registry models (torch); built once, shared by the coordinator tests.

Imports torch only inside fixtures, so collecting tests/ without torch skips instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.edge_agent.conftest import segment, toy  # noqa: F401  (the toy-model fixtures, for the build tests)

if TYPE_CHECKING:
    from torch import nn

    from coordinator.export import ForwardModel

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST shaped (models.InputSpec defaults)
NUM_CLASSES = 10
MODEL_NAMES = ("mlp", "cnn", "vgg11")


@dataclass(frozen=True)
class Exported:
    model: nn.Module  # the torch model, in the state it was exported in
    forward: ForwardModel


def _nontrivial_batchnorm(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm running stats other than 0/1 so export and eval tests can see them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """``exported(name)``: the model built with seed 0 and its forward export (cached per session)."""
    torch = pytest.importorskip("torch")
    from coordinator.export import export_forward
    from models import InputSpec, build_model

    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            torch.manual_seed(0)
            model = build_model(name, InputSpec())
            _nontrivial_batchnorm(model, seed=1)
            forward = export_forward(model, INPUT_SHAPE, NUM_CLASSES, tmp_path_factory.mktemp(f"export-{name}"))
            cache[name] = Exported(model, forward)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifact-cache")
