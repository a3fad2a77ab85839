"""``snake-agent check``: is this machine ready to serve trials? Each check says what it found and, when it
fails, how to fix it. Nothing trains; the broker check connects under its own client id (``<id>-check``),
so a running agent on the same id is not kicked off the broker.

Memory: the agent's footprint is measured, not guessed: the data loaded and the runtime running the
calibration graph (what an idle agent holds, the ``baseline`` of its hello). Against the budget the
check sets that footprint plus the cheapest segment of every model whose bundles sit in the cache (the
whole model held for the forward pass plus gradients and two Adam moments of its smallest trained set;
activations depend on the batch and are left to the planner, so this is a lower bound). With no bundle
cached the footprint alone is checked, and ``snake-coordinator plan`` gives per-hop figures.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent import profile
from edge_agent.backends import installed
from edge_agent.config import AgentConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.localdata import LocalData, load_local
from edge_agent.protocol.manifest import SegmentManifest, read_manifest

MIN_FREE_DISK_MB = 512  # bundles of a VGG-11 trial are tens of MiB each; the last model as much again
CLOCK_FLOOR = 1_735_689_600  # 2025-01-01 UTC: a board without a clock battery boots in the past until NTP syncs
INSTALL_HINT = "pip install 'snakelearn[agent-portable]' (any board) or 'snakelearn[agent]' (x86-64, Python <= 3.12)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_backend(config: AgentConfig) -> Check:
    """The trainer backend is installed and onnxruntime runs a graph (the calibration convolutions)."""
    have = installed()
    if not have:
        return Check("backend", False, "no onnxruntime installed: no trainer backend", INSTALL_HINT)
    name = have[0] if config.backend == "auto" else config.backend
    if name not in have:
        return Check("backend", False, f"backend {name!r} is not installed (installed: {', '.join(have)})",
                     f"use --backend {have[0]}, or {INSTALL_HINT}")  # fmt: skip
    from edge_agent.calibrate import measure_gflops

    try:
        if name == "ort":
            from edge_agent.ort_training import training_module

            training_module("api")
        gflops = measure_gflops(config.threads, runs=5, budget_s=0.5)
    except EdgeAgentError as exc:
        return Check("backend", False, f"{name}: {exc}", INSTALL_HINT)
    if gflops is None:
        return Check("backend", False, f"{name}: onnxruntime cannot run the calibration graph (see the log)",
                     "reinstall onnxruntime for this machine's architecture and Python")  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in profile.versions().items())
    return Check("backend", True, f"{name} ({versions}); {gflops:g} GFLOP/s")


def check_no_torch() -> Check:
    """The agent never needs torch: it is not imported by anything the checks ran."""
    if "torch" in sys.modules:
        return Check("torch", False, "torch was imported by the agent (a packaging bug)", "report it")
    return Check("torch", True, "not needed (not imported)")


def check_data(config: AgentConfig) -> tuple[Check, LocalData | None]:
    try:
        data = load_local(config)
    except EdgeAgentError as exc:
        return Check("data", False, str(exc), _data_fix(config.data)), None
    present = sum(1 for count in data.histogram() if count)
    detail = (f"{config.data}: {len(data.y_train)} training and {len(data.y_val)} validation samples of shape "
              f"{tuple(data.input_shape)}, {present} of {data.num_classes} labels present")  # fmt: skip
    return Check("data", True, detail), data


def _data_fix(spec: str) -> str:
    if spec.split(":", 1)[0] == "fashion-mnist":
        return "apt-get install dataset-fashion-mnist, or --data fashion-mnist:DIR with the four IDX .gz files"
    return "check the path in --data (cifar10:DIR with the python batches, npz:FILE as in the README)"


def model_needs_mb(manifests: list[SegmentManifest]) -> dict[str, float]:
    """Per model (named by its tensor count and size) the cheapest segment's MiB beyond the idle footprint."""
    cheapest: dict[str, float] = {}
    for m in manifests:
        sizes = {n: 4 * _numel(m.shapes[n]) for n in m.order}
        model = sum(sizes.values())
        name = f"{len(m.order)} tensors, {model / (1 << 20):.1f} MiB"
        need = (model + 3 * sum(sizes[n] for n in m.trainable)) / (1 << 20)
        cheapest[name] = min(cheapest.get(name, need), need)
    return cheapest


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def cached_manifests(cache_dir: Path) -> list[SegmentManifest]:
    found = []
    for bundle in sorted((cache_dir / "artifacts").glob("*/manifest.json")):
        try:
            found.append(read_manifest(bundle.parent))
        except EdgeAgentError:
            continue  # a damaged bundle is fetched again when a trial needs it
    return found


def check_memory(config: AgentConfig, data: LocalData | None) -> Check:
    budget = config.memory_budget_mb or profile.memory_budget_mb()
    footprint = profile.rss_mb()  # after the data check loaded the data and the backend check ran a graph
    needs = model_needs_mb(cached_manifests(config.cache_dir))
    need = footprint + (max(needs.values()) if needs else 0.0)
    models = "; ".join(f"{k}: cheapest segment +{v:.0f} MiB" for k, v in needs.items()) or "no model bundle cached yet"
    detail = f"budget {budget} MiB; idle footprint {footprint:.0f} MiB{'' if data else ' (no data loaded)'}; {models}"
    if budget <= 0:
        return Check("memory", False, detail, "set --memory-budget-mb to what the agent may use")
    if need >= budget:
        return Check("memory", False, f"{detail}: needs at least {need:.0f} MiB",
                     "raise --memory-budget-mb (or the cgroup/MemoryMax limit), cap --samples, or serve smaller models")  # fmt: skip
    return Check("memory", True, f"{detail}; at least {need:.0f} MiB needed")


def check_disk(config: AgentConfig) -> Check:
    path = config.cache_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".check-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(path).free >> 20
    except OSError as exc:
        return Check("disk", False, f"cache {path} is not writable: {exc.strerror or exc}",
                     "use --cache-dir on a writable disk, or chown the directory to the agent's user")  # fmt: skip
    if free < MIN_FREE_DISK_MB:
        return Check("disk", False, f"cache {path}: {free} MiB free, less than {MIN_FREE_DISK_MB} MiB",
                     "free space there or point --cache-dir to a larger disk")  # fmt: skip
    return Check("disk", True, f"cache {path}: writable, {free} MiB free")


def check_clock(now: Callable[[], float] = time.time) -> Check:
    """A clock in the past (no RTC, no NTP yet) makes TLS certificates look not yet valid and ages wrong."""
    stamp = now()
    shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
    if stamp < CLOCK_FLOOR:
        return Check("clock", False, f"system time {shown} is before 2025",
                     "enable time sync (timedatectl set-ntp true) and wait for it; "
                     "boards without a clock battery start in the past")  # fmt: skip
    synced = _ntp_synchronized()
    note = {True: "NTP synchronized", False: "NTP not synchronized yet", None: "sync state unknown"}[synced]
    return Check("clock", True, f"{shown} ({note})")


def _ntp_synchronized() -> bool | None:
    if shutil.which("timedatectl") is None:
        return None
    import subprocess

    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                             text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return {"yes": True, "no": False}.get(value)


def run_checks(config: AgentConfig, broker: Callable[[AgentConfig], list[Check]]) -> list[Check]:
    """Every check, in the order a user fixes things: runtime, data, memory, disk, clock, broker."""
    results = [check_backend(config)]
    data_check, data = check_data(config)
    results += [data_check, check_memory(config, data), check_disk(config), check_clock()]
    results += broker(config)
    results.append(check_no_torch())
    return results
