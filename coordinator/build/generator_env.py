"""What ``generate_artifacts`` needs around it for a forward model whose tensors are ONNX external data.

The generator is handed the forward graph with its tensors left external (never loaded: the training
graphs carry no weights). Two things in onnxruntime-training 1.19.2 then need help:

- its blocks run ``onnx.checker.check_model(proto, full_check=True)`` on the in-memory graph, which looks
  for the external data file relative to the working directory: the directory is switched to the forward
  model's for the call (under the caller's generator lock);
- it always writes a full ``checkpoint`` (every weight, read from the data file: gigabytes for a large
  model) besides the nominal one we keep and ship. That write is made nominal too; the file is deleted
  right after anyway.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from coordinator.onnx_external import uses_external_data
from edge_agent.ort_training import training_module


@contextlib.contextmanager
def generator_env(model: onnx.ModelProto, base_dir: Path | None) -> Iterator[None]:
    """Run ``generate_artifacts`` for ``model`` (its external data, if any, under ``base_dir``)."""
    onnxblock = training_module("onnxblock")
    original = getattr(onnxblock, "save_checkpoint")  # noqa: B009 (the library's module attribute)

    def nominal_only(parameters: object, path: object, nominal_checkpoint: bool = False) -> object:
        del nominal_checkpoint  # the full checkpoint is never used: weights travel separately
        return original(parameters, path, nominal_checkpoint=True)

    switch = base_dir is not None and uses_external_data(model)
    previous = Path.cwd()
    setattr(onnxblock, "save_checkpoint", nominal_only)  # noqa: B010
    try:
        if switch:
            os.chdir(Path(base_dir))  # type: ignore[arg-type]
        yield
    finally:
        setattr(onnxblock, "save_checkpoint", original)  # noqa: B010
        if switch:
            os.chdir(previous)
