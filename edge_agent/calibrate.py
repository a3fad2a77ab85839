"""A short speed calibration on the agent's own runtime, reported in its hello.

Four 3x3 convolutions (32 channels, 16x16, batch 16) run single-threaded in an onnxruntime
``InferenceSession``; the fastest of many short timed runs gives the per-core GFLOP/s, and the
agent reports that times the threads it trains with (capped by the cores it may use). Both
choices make the figure hold up when other processes compete for the machine, as agents
simulated on one machine do: they only ever slow a run down, a run of a few milliseconds often
fits between them, and a multi-threaded run stalls on whichever thread was descheduled (four
agents calibrating at once on 2 cores read 11-97 GFLOP/s with 2 threads and the median of 7
runs; 22-32 per core with this method). Both backends run onnxruntime's CPU kernels, so the
figure ranks agents the way their training speed does; the coordinator's cost model turns it
into hop time (``coordinator.costmodel.hop_seconds``). The graph (``calibrate.onnx``, 400
bytes) takes its weights as an input, so it ships without data.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from edge_agent.ort_training import import_onnxruntime

log = logging.getLogger(__name__)

GRAPH = Path(__file__).with_name("calibrate.onnx")
BATCH, CHANNELS, SIZE, LAYERS = 16, 32, 16, 4
FLOPS = LAYERS * 2 * BATCH * CHANNELS * SIZE * SIZE * CHANNELS * 9  # per run


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def measure_gflops(threads: int = 0, runs: int = 40, budget_s: float = 1.5) -> float | None:
    """GFLOP/s of this machine's onnxruntime on the reference convolutions with ``threads`` training
    threads (0: as many as usable cores); None if it cannot run."""
    try:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(GRAPH), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {
            "x": rng.standard_normal((BATCH, CHANNELS, SIZE, SIZE), dtype=np.float32),
            "w": rng.standard_normal((CHANNELS, CHANNELS, 3, 3), dtype=np.float32) * 0.05,
        }
        session.run(None, feeds)  # warm-up
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and time.perf_counter() < deadline:
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a missing runtime or graph must not stop the agent
        log.warning("speed calibration failed: %s", exc)
        return None
    parallel = min(threads, usable_cores()) if threads > 0 else usable_cores()
    return round(parallel * FLOPS / min(times) / 1e9, 3)
