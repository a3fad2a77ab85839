"""Typed message bodies, one frozen dataclass per message type (:class:`~edge_agent.protocol.kinds.MessageType`).

Commands are imperative (``assign``, ``artifact_request``, ``abort``,
``shutdown``); reports are facts (``hello``, ``hop_started``, ``hop_progress``,
``hop_done``, ``transfer_ack``); ``chunk`` is the body of a binary frame.
``body_of`` turns an envelope's body into its dataclass, checking every field
(a ``StrEnum`` field accepts only its members' values).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, Union

from edge_agent.protocol.envelope import MAX_INT
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import Purpose


@dataclass(frozen=True)
class Status:
    state: str  # "online" | "offline"


@dataclass(frozen=True)
class Hello:
    """An agent's profile: what the planner needs, never the data itself."""

    agent_id: str
    backend: str  # "ort" | "portable" | "fake"
    versions: dict[str, str]  # package -> version
    arch: str  # platform.machine()
    system: str  # platform.system()
    python: str
    cores: int
    memory_mb: int  # physical memory
    memory_budget_mb: int  # what the agent may use in all (default: physical memory or its cgroup limit)
    num_train: int
    num_val: int
    num_classes: int
    input_shape: list[int]  # per sample, [C, H, W]
    label_histogram: list[int]
    gflops: float | None = None  # speed calibrated on its own runtime (edge_agent.calibrate)
    baseline_mb: float | None = None  # resident memory when idle, runtime imported
    instance: str = ""  # random per agent process: a hello from a new instance is a restarted agent


@dataclass(frozen=True)
class HopTask:
    """One hop an agent must perform in a trial."""

    round: int
    hop: int  # global hop index in the trial, 0-based
    segment: int  # segment index
    groups: list[str]  # layer groups this hop trains
    tensors: list[str]  # wire names owned by those groups (parameters and buffers)
    artifact_sha256: str  # the segment's training artifacts
    artifact_size: int
    prev: str  # who sends this hop the model: an agent id or "coordinator"
    next: str  # who receives the model after the hop
    epochs: int
    batch_size: int
    lr: float
    seed: int
    max_steps: int | None = None
    checkpoint: bool = False  # also send the coordinator a copy after this hop (per-round evaluation)
    kd_alpha: float = 0.0  # knowledge distillation weight (0 = off; > 0 needs a KD bundle)
    kd_temperature: float = 2.0
    split: bool = False  # split learning: train the front batch by batch with the coordinator's gradients
    gradient_timeout_s: float = 60.0  # split: give up on the hop when a batch's gradient takes longer
    # group versions the receiver of this hop's model holds (its cached copy); send only newer groups.
    # Empty: the receiver holds nothing, send the whole model.
    next_holds: dict[str, int] = field(default_factory=dict)
    logit_adjust: float = 0.0  # tau of the logit adjustment by the hop's label prior (0 = off; needs a KD bundle)
    bn_mix: float = 0.0  # weight of the hop's BatchNorm running statistics against the received ones (0 = off)
    prox_mu: float = 0.0  # FedProx: proximal term mu/2 ||w - w_received||^2 on the trained parameters (0 = off)


@dataclass(frozen=True)
class Assign:
    tasks: list[HopTask]
    chunk_bytes: int
    compression: str = "none"  # "none" | "fp16"
    groups: dict[str, list[str]] = field(default_factory=dict)  # layer group -> parameter names; empty: no deltas
    # a re-plan (an agent was lost or came back): forget the tasks of this trial from this hop on, then take
    # ``tasks``; None: add ``tasks`` to those already known
    replace_from: int | None = None


@dataclass(frozen=True)
class HandOff:
    """Send ``to`` the whole model for ``hop`` (the one this agent handed on after ``hop - 1``, from its
    cache): the coordinator re-routes a hop whose agent was lost, or a sender that restarted resumes."""

    hop: int
    to: str
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    """An agent in a trial is alive; ``training`` is the hop it trains (None: waiting)."""

    training: int | None = None


@dataclass(frozen=True)
class ModelRequest:
    """Send me the whole model for ``hop``: my cached copy cannot complete the delta you sent."""

    hop: int
    reason: str


@dataclass(frozen=True)
class ArtifactRequest:
    sha256: str


@dataclass(frozen=True)
class Chunk:
    """Header body of a binary frame carrying ``data[offset:offset+len]`` of a transfer."""

    transfer_id: str
    purpose: Purpose
    seq: int
    count: int
    size: int  # whole transfer, bytes
    sha256: str  # whole transfer
    chunk_sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferAck:
    transfer_id: str
    sha256: str


@dataclass(frozen=True)
class TransferNack:
    """Resend these chunks (all of them when ``missing`` is empty)."""

    transfer_id: str
    missing: list[int]
    reason: str


@dataclass(frozen=True)
class HopStarted:
    round: int
    hop: int
    segment: int
    total_steps: int


@dataclass(frozen=True)
class HopProgress:
    round: int
    hop: int
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class HopDone:
    round: int
    hop: int
    segment: int
    train_loss: float
    val_loss: float | None  # None: the hop has no validation (split learning's front alone has no output)
    val_accuracy: float | None
    steps: int
    samples: int
    train_s: float
    trainable_params: int
    model_sha256: str  # digest of the model this hop handed on
    model_bytes: int
    bytes_sent: int  # cumulative for this agent process
    bytes_received: int
    peak_rss_mb: float
    backend: str


@dataclass(frozen=True)
class Bye:
    """Final figures an agent sends when told to shut down."""

    bytes_sent: int
    bytes_received: int
    peak_rss_mb: float
    hops: int
    bytes_retransmitted: int = 0  # resent chunks and whole-model resends (recovery), part of bytes_sent
    rejected: dict[str, int] = field(default_factory=dict)  # inbound messages refused, by reason (since 1.x)


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Shutdown:
    reason: str = "trial finished"
    exit: bool = True  # False: say bye but stay up for the next trial
    # for an agent the trial left out (it holds no trial id): the instance its hello named, so a shutdown
    # queued for an earlier process of the same agent stops nothing
    instance: str = ""


T = TypeVar("T")
# integer fields that cannot be negative (counts, sizes, indices); the decoder already bounds every integer
# to 64 bits and every number to finite values
NON_NEGATIVE = {
    "HopTask": ("round", "hop", "segment", "artifact_size", "epochs", "batch_size", "max_steps", "logit_adjust",
                "bn_mix", "prox_mu"),
    "Assign": ("chunk_bytes",),
    "ModelRequest": ("hop",),
    "Chunk": ("seq", "count", "size"),
    "TransferNack": ("missing",),
    "HopStarted": ("round", "hop", "segment", "total_steps"),
    "HopProgress": ("round", "hop", "step", "total_steps"),
    "HopDone": ("round", "hop", "segment", "steps", "samples", "trainable_params", "model_bytes", "bytes_sent",
                "bytes_received"),
    "Bye": ("bytes_sent", "bytes_received", "hops", "rejected"),
    "Hello": ("cores", "memory_mb", "memory_budget_mb", "num_train", "num_val", "num_classes", "input_shape",
              "label_histogram"),
}  # fmt: skip


def to_body(message: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready body."""
    return dataclasses.asdict(message)


def body_of(kind: type[T], body: dict[str, Any]) -> T:
    """Body -> dataclass, checking presence and type of every field (unknown keys ignored)."""
    return typing.cast(T, _build(kind, body, kind.__name__))


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    """A message class's field types, resolved once (``get_type_hints`` costs ~0.3 ms per call)."""
    return typing.get_type_hints(kind)


def _build(kind: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError("malformed", f"{where} is not an object")
    hints = _hints(kind)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.name in body:
            values[f.name] = _check(hints[f.name], body[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError("malformed", f"{where}: missing field {f.name!r}")
    for name in NON_NEGATIVE.get(kind.__name__, ()):
        if _negative(values.get(name)):
            raise ProtocolError("malformed", f"{where}.{name} is negative")
    return kind(**values)


def _negative(value: Any) -> bool:
    if isinstance(value, list):
        return any(_negative(v) for v in value)
    if isinstance(value, dict):
        return any(_negative(v) for v in value.values())
    return isinstance(value, int | float) and value < 0


def _show(value: Any) -> str:
    """A value from the wire, short enough for an error message (never the whole payload)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError("malformed", f"{where} is not a list")
        (item,) = typing.get_args(hint)
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError("malformed", f"{where} is not an object")
        _, item = typing.get_args(hint)
        return {str(k): _check(item, v, f"{where}.{_show(k)}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, where)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        known = [member.value for member in hint]
        if isinstance(value, str) and value in known:
            return hint(value)
        raise ProtocolError("malformed", f"{where} is {_show(value)}, not one of {', '.join(known)}")
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT < value < MAX_INT:
        raise ProtocolError("bad_number", f"{where} does not fit in 64 bits")  # the decoder refuses these too
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ProtocolError("bad_number", f"{where} is not finite")
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise ProtocolError("malformed", f"{where} is not {getattr(hint, '__name__', hint)}")
