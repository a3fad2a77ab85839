"""Label skew: how far the agents' label histograms (from their hellos) are from the fleet's label mix, and
which in-hop methods against it a trial switches on. Pure functions.

Sequential training forgets: a snake round ends on a classifier trained on one agent's labels, and every
BatchNorm layer's running statistics follow the last hop's data. Under label skew the trial therefore
turns on (``[train] label_skew = "auto"``, the default, when :data:`SKEWED_AT` is reached):

* **logit adjustment** (``logit_adjust``, tau): the hop's cross-entropy is taken on
  ``logits + tau * log(local label prior)``, so the classifier learns scores for a uniform label mix
  instead of the hop's own, and barely pushes down classes the hop does not hold;
* **distillation** from the model as received (``skew_kd_alpha``, unless ``kd_alpha`` is set):
  keeps what earlier hops taught about classes this hop lacks;
* **BatchNorm statistics mixing** (``bn_mix``): after a hop every running mean/variance is the mixture
  ``(1 - w) * received + w * hop's`` (moments mixed, so the variance includes the spread of the means),
  a running average over hops instead of the last hop's data alone.

IID fleets stay exactly as they were (none of this runs), so their accuracy cannot drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.config import TrainConfig
from coordinator.plan import SkewMethods

SKEWED_AT = 0.15  # mean total variation distance from the fleet's label mix; IID shares of 3,000 samples: ~0.03


def distances(histograms: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Each agent's total variation distance (0..1) between its label mix and the fleet's pooled mix; empty
    when there are no comparable histograms (none, all empty, or of different lengths)."""
    named = {a: np.asarray(h, np.float64) for a, h in histograms.items() if sum(h) > 0}
    if not named or len({len(r) for r in named.values()}) != 1:
        return {}
    counts = np.stack(list(named.values()))
    pooled = counts.sum(0) / counts.sum()
    tv = 0.5 * np.abs(counts / counts.sum(1, keepdims=True) - pooled).sum(1)
    return {a: float(d) for a, d in zip(named, tv, strict=True)}


def label_skew(histograms: Mapping[str, Sequence[int]]) -> float:
    """Sample-weighted mean total variation distance between each agent's label mix and the fleet's (0..1);
    0 without histograms."""
    tv = distances(histograms)
    if not tv:
        return 0.0
    weights = {a: float(sum(histograms[a])) for a in tv}
    return float(sum(tv[a] * weights[a] for a in tv) / sum(weights.values()))


def decide(train: TrainConfig, histograms: Mapping[str, Sequence[int]]) -> SkewMethods:
    """The label-skew methods for a trial whose agents report ``histograms`` (agent -> samples per class)."""
    skew = label_skew(histograms)
    if train.label_skew == "off":
        active, reason = False, "label_skew = off"
    elif train.label_skew == "on":
        active, reason = True, "label_skew = on"
    elif skew >= SKEWED_AT:
        active, reason = True, f"at or above {SKEWED_AT:g} (label_skew = auto)"
    else:
        active, reason = False, f"below {SKEWED_AT:g} (label_skew = auto)"
    if not active:
        return SkewMethods(skew, False, train.kd_alpha, reason=reason)
    alpha = train.kd_alpha if train.kd_alpha > 0 else train.skew_kd_alpha
    return SkewMethods(skew, True, alpha, train.logit_adjust, train.bn_mix, reason)


def label_mix(histogram: Sequence[int], top: int = 3) -> str:
    """An agent's largest classes as shares, e.g. ``3:61% 7:22% 0:9%`` (for ``plan`` output)."""
    counts = np.asarray(histogram, np.float64)
    total = counts.sum()
    if total <= 0:
        return "no labels"
    order = np.argsort(-counts, kind="stable")[:top]
    return " ".join(f"{int(c)}:{counts[c] / total:.0%}" for c in order if counts[c] > 0)
