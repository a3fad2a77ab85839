"""How much memory and time a hop needs: the planner's cost model. Pure.

A hop that trains layer groups ``[lo, hi)`` of a model holds, on the agent:

* **the runtime, the agent and its data** (``baseline_mb``, which every agent measures and reports in
  its hello: about 80 MiB on x86_64 for either backend with 2000 Fashion-MNIST samples);
* **the model in transit** (the received chunks and the joined payload) *or* the trainer, whichever
  is larger: the agent frees the payload once the trainer holds the weights;
* in the trainer, **the whole model's weights**: every hop runs the full forward, so every agent
  holds every tensor, whatever it trains (the runtime's copy, briefly the loaded arrays too);
* **training state for the segment only**: gradients and optimizer state (AdamW: two moments)
  for the trainable parameters;
* **activations**: what the backward pass keeps, from the first trained group to the loss (the
  gradient flows back through every later group, frozen or not, so a front segment keeps nearly
  as much as the whole model while a classifier segment keeps almost nothing);
* a fixed per-session overhead.

On ONNX Runtime the forward buffers of frozen layers cost memory too (the runtime plans
buffers for the whole graph), hence a term in every group's activations on top of the
kept ones.

Per-group activation and compute figures come from :mod:`coordinator.costs` (measured with
torch once on the coordinator). The coefficients below were fitted to the peaks that
``tools/bench_costmodel.py`` measured on ORT and portable trainers (cnn and vgg11, front, middle,
back and whole-model segments, batch 16 to 128); the stated tolerance (``TOLERANCE``, per backend)
covers that fit's worst residual, and
``tests/coordinator/test_costmodel.py`` checks it on real training runs of cases the fit never saw.

Time: a hop's compute is the forward of every group, the input gradients of the groups after
``lo`` and the weight gradients of ``[lo, hi)`` (each about one forward), per sample, divided by the agent's calibrated
speed (GFLOP/s of its own runtime on a reference convolution, see :mod:`edge_agent.calibrate`)
times ``TRAIN_EFFICIENCY`` (training kernels run below inference speed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

MIB = float(1 << 20)
FLOAT = 4  # bytes


# Least-squares fit to tools/bench_costmodel.py's 12 cases per backend (see the module docstring).
@dataclass(frozen=True)
class Coefficients:
    overhead_mb: float  # sessions, graphs, allocator
    weight_copies: float  # full-model copies in the trainer (loaded arrays, flat buffer, runtime)
    state_copies: float  # per trainable float: gradient, accumulator, AdamW moments
    kept_factor: float  # x autograd-saved activations from the first trained group to the loss
    forward_factor: float  # x all groups' activations: forward buffers the runtime plans for every layer


COEFFICIENTS = {
    "ort": Coefficients(24.2, 1.12, 3.25, 0.93, 0.23),
    "portable": Coefficients(36.3, 1.19, 2.78, 0.83, 0.05),
}
# an idle agent, runtime imported, calibrated, no data (x86_64; for `plan`)
TYPICAL_BASELINE_MB = {"ort": 78.0, "portable": 77.0}
TRANSFER_COPIES = 2.0  # agent, before the trainer: the received chunks and the joined payload
# Trainer estimates are within this many MiB, or this fraction, of the measured peak share (the fit's
# worst residuals: ORT 8.8 MiB, portable 20.8 MiB; the portable trainer's memory is less regular).
TOLERANCE = {"ort": (20.0, 0.15), "portable": (50.0, 0.25)}
TRAIN_EFFICIENCY = 0.3  # training GFLOP/s over calibrated GFLOP/s (vgg11 snake trial, ORT, 2 threads: 0.22-0.33)
# A hop's fixed cost whatever its segment: session creation, completing and encoding the model, the
# hand-over (measured here: 0.1-0.2 s for cnn, about 1 s for vgg11). Without it, hops of a few
# hundredths of a second look 3x apart on calibration noise alone and rotation is given up for nothing.
HOP_OVERHEAD_S = 0.5
TYPICAL_GFLOPS = 100.0  # a 2-core x86_64 agent here (edge_agent.calibrate); for `plan` when the fleet says nothing


class GroupCosts(Protocol):
    """What the cost model reads of a layer group (``plan.GroupInfo`` has it)."""

    @property
    def num_params(self) -> int: ...

    @property
    def num_buffer_elems(self) -> int: ...

    @property
    def act_bytes(self) -> int: ...

    @property
    def flops(self) -> int: ...


@dataclass(frozen=True)
class MemoryEstimate:
    weights_mb: float
    state_mb: float
    activations_mb: float
    overhead_mb: float

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.state_mb + self.activations_mb + self.overhead_mb

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()} | {"total_mb": round(self.total_mb, 1)}


def model_bytes(groups: Sequence[GroupCosts]) -> int:
    """Every float tensor of the model (parameters and buffers), bytes."""
    return FLOAT * sum(g.num_params + g.num_buffer_elems for g in groups)


def memory_terms(groups: Sequence[GroupCosts], lo: int, hi: int, batch: int) -> tuple[float, ...]:
    """What each of ``Coefficients``' fields multiplies, in MiB, for training groups ``[lo, hi)``: one (the
    overhead), the model's tensors, the trainable floats, the activations kept from ``lo`` to the loss and
    all groups' activations (``tools/bench_costmodel.py --fit`` regresses measured peaks on these)."""
    if not 0 <= lo < hi <= len(groups):
        raise ValueError(f"segment [{lo}, {hi}) is not within {len(groups)} groups")
    trainable = FLOAT * sum(g.num_params for g in groups[lo:hi]) / MIB
    kept = batch * sum(g.act_bytes for g in groups[lo:]) / MIB
    planned = batch * sum(g.act_bytes for g in groups) / MIB
    return 1.0, model_bytes(groups) / MIB, trainable, kept, planned


def trainer_memory(
    groups: Sequence[GroupCosts], lo: int, hi: int, batch: int, optimizer: str = "adamw", backend: str = "ort"
) -> MemoryEstimate:
    """Memory a trainer adds on top of the imported runtime to train groups ``[lo, hi)``."""
    one, weights, trainable, kept, planned = memory_terms(groups, lo, hi, batch)
    k = COEFFICIENTS["portable" if backend == "portable" else "ort"]
    state = k.state_copies if optimizer == "adamw" else k.state_copies / 2  # SGD: no moments
    return MemoryEstimate(
        weights_mb=k.weight_copies * weights,
        state_mb=state * trainable,
        activations_mb=k.kept_factor * kept + k.forward_factor * planned,
        overhead_mb=k.overhead_mb * one,
    )


def within_tolerance(estimated_mb: float, measured_mb: float, backend: str = "ort") -> bool:
    mib, fraction = TOLERANCE["portable" if backend == "portable" else "ort"]
    return abs(estimated_mb - measured_mb) <= max(mib, fraction * measured_mb)


def hop_memory_mb(
    groups: Sequence[GroupCosts],
    lo: int,
    hi: int,
    batch: int,
    baseline_mb: float,
    optimizer: str = "adamw",
    backend: str = "ort",
    data_mb: float = 0.0,
) -> float:
    """Peak RSS of an agent during a hop: its idle footprint and its data as stored (``data_mb``)
    throughout, plus the larger of two phases that do not overlap: the model in transit (chunks and
    the joined payload, freed once the trainer holds the weights) and the trainer (loading,
    training, then evaluating in training-sized batches)."""
    transit = TRANSFER_COPIES * model_bytes(groups) / MIB
    trainer = trainer_memory(groups, lo, hi, batch, optimizer, backend).total_mb
    return baseline_mb + data_mb + max(transit, trainer)


def hop_flops(groups: Sequence[GroupCosts], lo: int, hi: int, samples: int) -> float:
    """Training compute of a hop on ``[lo, hi)``: the forward of every group, the gradient with respect
    to the input of every group after ``lo`` (it flows back through frozen groups too), and the
    weight gradients of the trained groups (each about one forward)."""
    forward = sum(g.flops for g in groups)
    input_grads = sum(g.flops for g in groups[lo + 1 :])
    weight_grads = sum(g.flops for g in groups[lo:hi])
    return float(samples) * (forward + input_grads + weight_grads)


def hop_seconds(groups: Sequence[GroupCosts], lo: int, hi: int, samples: int, gflops: float | None) -> float:
    """Estimated hop time: ``HOP_OVERHEAD_S`` + compute; ``gflops`` is the agent's calibrated speed
    (unknown: 1 GFLOP/s)."""
    speed = (gflops if gflops and gflops > 0 else 1.0) * 1e9 * TRAIN_EFFICIENCY
    return HOP_OVERHEAD_S + hop_flops(groups, lo, hi, samples) / speed
