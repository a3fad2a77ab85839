"""Optimizer updates in numpy, for backends whose graphs return gradients (``PortableTrainer``).

Both follow ONNX Runtime's training kernels step for step, in float32, so a
portable hop lands where an ``OrtTrainer`` hop lands:

* ``sgd``: ``w -= lr * g`` (SGDOptimizerV2, no momentum).
* ``adamw``: torch.optim.AdamW's rule (ORT AdamWOptimizer, adam_mode 0): betas 0.9/0.999,
  eps 1e-8, weight decay 0.01 applied to the weight before the step, bias correction
  of both moments.

Updates happen in place on the arrays passed in. ``ADAMW_*`` are the AdamW defaults of the
whole toolkit: the artifact builder bakes them into ORT's optimizer graph and the coordinator's
torch back of split learning uses them, so every backend steps alike.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Protocol

import numpy as np

ADAMW_BETAS = (0.9, 0.999)  # the defaults of torch.optim.AdamW and of ORT
ADAMW_EPS = 1e-8  # torch.optim.AdamW default (ORT's default is 1e-6)
ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW default (ORT's default is 0)


class Optimizer(Protocol):
    name: str

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> None:
        """Update every tensor in ``grads`` (float32, in place in ``params``)."""


class SGD:
    name = "sgd"

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> None:
        rate = np.float32(lr)
        for key, grad in grads.items():
            params[key] -= rate * grad


class AdamW:
    """AdamW with torch's update rule; the moments and step count live until the object is dropped."""

    name = "adamw"

    def __init__(
        self,
        betas: tuple[float, float] = ADAMW_BETAS,
        eps: float = ADAMW_EPS,
        weight_decay: float = ADAMW_WEIGHT_DECAY,
    ) -> None:
        self.beta1, self.beta2 = np.float32(betas[0]), np.float32(betas[1])
        self.eps, self.weight_decay = np.float32(eps), np.float32(weight_decay)
        self.steps = 0
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}

    def step(self, params: MutableMapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> None:
        self.steps += 1
        rate = np.float32(lr)
        one = np.float32(1.0)
        # as ORT: the power in double (of the float32 betas), rounded, then subtracted in float32
        correction1 = one - np.float32(float(self.beta1) ** self.steps)
        correction2 = one - np.float32(float(self.beta2) ** self.steps)
        for key, grad in grads.items():
            weight = params[key]
            m = self._m.setdefault(key, np.zeros_like(weight))
            v = self._v.setdefault(key, np.zeros_like(weight))
            weight -= weight * rate * self.weight_decay
            m[...] = self.beta1 * m + (one - self.beta1) * grad
            v[...] = self.beta2 * v + (one - self.beta2) * grad * grad
            denom = np.sqrt(v / correction2) + self.eps
            weight -= (rate * m) / (correction1 * denom)


def make_optimizer(name: str) -> Optimizer:
    if name == "sgd":
        return SGD()
    if name == "adamw":
        return AdamW()
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


def proximal_pull(param: np.ndarray, anchor: np.ndarray, rate: float) -> None:
    """FedProx's proximal term mu/2 ||w - w0||^2, applied decoupled after each optimizer step (as AdamW applies
    weight decay): ``param -= rate * (param - anchor)`` in place, ``rate`` = lr * mu."""
    param -= np.float32(rate) * (param - anchor)
