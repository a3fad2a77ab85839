"""What an agent tells the coordinator about its machine (never its data)."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "snakelearn",
    "onnxruntime-training-cpu",
    "onnxruntime-training",
    "onnxruntime",
    "onnx",
    "numpy",
    "paho-mqtt",
)


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter for training and the wire."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def memory_mb() -> int:
    """Physical memory of the machine in MiB (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError, AttributeError):
        return 0


def rss_mb() -> float:
    """Resident set size of this process now, MiB (0 when unknown)."""
    return _status_mb("VmRSS:") or 0.0


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024  # the file says KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_limit_mb(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``),
    MiB; None when there is none (or it is larger than any real machine)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            candidate = Path(root, rel, "memory.max")  # v2 unified hierarchy
        elif "memory" in controllers.split(","):
            candidate = Path(root, "memory", rel, "memory.limit_in_bytes")  # v1
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 50):  # v1 "no limit" is a huge number, v2 says "max"
            return int(text) >> 20
    return None


def memory_budget_mb() -> int:
    """What this agent may use by default: physical memory, or its cgroup's limit if smaller."""
    physical, limit = memory_mb(), cgroup_memory_limit_mb()
    return min(physical, limit) if limit and physical else (limit or physical)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB.

    On Linux from /proc (VmHWM): ``ru_maxrss`` survives exec, so a process spawned by a
    large parent (simulate's coordinator, with torch) would report the parent's size.
    """
    hwm = _status_mb("VmHWM:")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more from their own mappings (glibc ``mallopt``), so
    that freeing them returns the memory at once; False where unavailable.

    By default glibc raises this threshold as large blocks are freed (up to 32 MiB), after which a
    training step's activation and gradient buffers come from the heap, which fragments and keeps
    growing over the steps. Measured on a VGG-11 hop (portable backend): peak RSS 228-248 -> 182-207 MiB
    for a snake segment, 332 -> 302 MiB for FedAvg."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def return_free_memory() -> bool:
    """Hand memory the process freed back to the OS (glibc ``malloc_trim``); False where unavailable.

    After a training session is freed, glibc keeps its pages (in the training thread's arena) and the
    process stays as large as at the training peak; encoding the model on top of that would add a copy
    to the peak."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def machine() -> dict[str, str | int]:
    return {
        "arch": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cores": os.cpu_count() or 1,
        "memory_mb": memory_mb(),
    }
