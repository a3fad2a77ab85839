"""BatchNorm running statistics as a running average over hops (numpy only).

ONNX Runtime updates every BatchNorm layer's running mean and variance during a hop (momentum 0.1 a step), so
after a few dozen steps they describe this hop's data alone. Under label skew that is one agent's classes:
the model then normalises everyone's inputs with one agent's statistics. Mixing the statistics the hop
received with the ones it produced, ``(1 - w) * received + w * trained`` on the first and second moments,
keeps them an exponential average over the agents the model visited. The layers the hop trained keep the
hop's own statistics (the received ones describe weights that no longer exist); later hops mix them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_agent.protocol.manifest import SegmentManifest

MEAN_SUFFIX, VAR_SUFFIX = "running_mean", "running_var"


def mix_running_stats(
    received: Mapping[str, np.ndarray], trained: dict[str, np.ndarray], buffers: Sequence[str], weight: float
) -> dict[str, np.ndarray]:
    """``trained`` with every (running_mean, running_var) pair among ``buffers`` mixed with ``received``'s:
    moments ``(1 - weight) * received + weight * trained``. ``weight`` 1 (or 0: off) returns ``trained`` as is."""
    if not 0.0 < weight < 1.0:
        return trained
    w = np.float64(weight)
    for mean_name in (b for b in buffers if b.endswith(MEAN_SUFFIX)):
        var_name = mean_name[: -len(MEAN_SUFFIX)] + VAR_SUFFIX
        if var_name not in trained or mean_name not in received or var_name not in received:
            continue
        m0, v0 = received[mean_name].astype(np.float64), received[var_name].astype(np.float64)
        m1, v1 = trained[mean_name].astype(np.float64), trained[var_name].astype(np.float64)
        mean = (1 - w) * m0 + w * m1
        second = (1 - w) * (v0 + m0 * m0) + w * (v1 + m1 * m1)
        trained[mean_name] = mean.astype(np.float32)
        trained[var_name] = np.maximum(second - mean * mean, 0.0).astype(np.float32)
    return trained


def mixed_buffers(manifest: SegmentManifest) -> list[str]:
    """The buffers a hop mixes: every buffer but those of the groups it trained."""
    own = set(manifest.segment_buffers)
    return [b for b in manifest.buffers if b not in own]


def running_stats(tensors: Mapping[str, np.ndarray], buffers: Sequence[str]) -> dict[str, np.ndarray]:
    """Copies of the BatchNorm running statistics among ``buffers`` (what a hop must keep to mix them later)."""
    return {
        b: np.array(tensors[b], np.float32) for b in buffers if b in tensors and b.endswith((MEAN_SUFFIX, VAR_SUFFIX))
    }
