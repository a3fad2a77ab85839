"""A short speed calibration on the agent's own runtime, reported in its hello.

Four 3x3 convolutions (32 channels, 16x16, batch 16) run in an onnxruntime
``InferenceSession`` with the agent's thread setting; the median of a few timed runs
gives GFLOP/s. Both backends run onnxruntime's CPU kernels, so the figure ranks agents
the way their training speed does; the coordinator's cost model turns it into hop
time (``coordinator.costmodel.hop_seconds``). The graph (``calibrate.onnx``, 400 bytes)
takes its weights as an input, so it ships without data.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edge_agent.ort_training import import_onnxruntime

log = logging.getLogger(__name__)

GRAPH = Path(__file__).with_name("calibrate.onnx")
BATCH, CHANNELS, SIZE, LAYERS = 16, 32, 16, 4
FLOPS = LAYERS * 2 * BATCH * CHANNELS * SIZE * SIZE * CHANNELS * 9  # per run


def measure_gflops(threads: int = 0, runs: int = 7, budget_s: float = 2.0) -> float | None:
    """GFLOP/s of this machine's onnxruntime on the reference convolutions; None if it cannot run."""
    try:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        if threads > 0:
            options.intra_op_num_threads = threads
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
    return round(FLOPS / float(np.median(times)) / 1e9, 3)
