"""The back of a split model, trained by the coordinator with torch (the trial's optimizer and lr)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from edge_agent.optim import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY
from models.split import split_model

log = logging.getLogger(__name__)


class TorchBack:
    """Layer groups after ``cut`` of a private copy of ``model``; one optimizer for the whole trial
    (AdamW with the agents' defaults, :mod:`edge_agent.optim`)."""

    def __init__(self, model: nn.Module, cut: str, optimizer: str, lr: float) -> None:
        self.model = copy.deepcopy(model)
        self.model.train()
        _, self.part = split_model(self.model, cut)
        params = [p for name, p in self.part.named_parameters() if self.part.owns(name)]
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.AdamW(params, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
            if optimizer == "adamw"
            else torch.optim.SGD(params, lr=lr)
        )
        log.info("split back: %s (%d parameters)", ", ".join(self.part.groups), sum(p.numel() for p in params))

    def step(self, activations: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        a = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32)).requires_grad_(True)
        loss = functional.cross_entropy(self.part(a), torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        assert a.grad is not None  # a requires grad and reaches the loss
        return a.grad.numpy().copy(), float(loss.detach())

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            name: value.detach().numpy().copy()
            for name, value in self.model.state_dict().items()
            if value.is_floating_point() and self.part.owns(name)
        }
