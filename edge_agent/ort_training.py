"""Import ``onnxruntime.training``'s on-device parts without importing torch.

``import onnxruntime.training`` runs the package ``__init__``, which imports
``amp`` and ``optim`` and through them torch. The on-device parts
(``training.api``, ``training.artifacts``, ``training.onnxblock``) need no torch.
Registering a bare module object for ``onnxruntime.training`` (with ``__path__``
set to the installed folder) before importing them skips that ``__init__``.
This is the one module that knows the trick (see ORT-NOTES.md).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

from edge_agent.errors import EdgeAgentError

_BARE_PACKAGES = ("onnxruntime.training", "onnxruntime.tools")
"""Packages whose ``__init__`` imports torch (``tools`` does whenever torch is installed)."""
_ORTMODULE = "onnxruntime.training.ortmodule"


class OrtUnavailableError(EdgeAgentError):
    """onnxruntime-training is not installed (or is the wrong build)."""


def _onnxruntime_root() -> Path:
    """The installed onnxruntime package folder, found without importing it."""
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None and getattr(loaded, "__file__", None):
        root = Path(str(loaded.__file__)).parent
    else:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise OrtUnavailableError("onnxruntime is not installed; install onnxruntime-training-cpu")
        root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "training" / "api").is_dir():
        raise OrtUnavailableError(f"onnxruntime at {root} has no training support; install onnxruntime-training-cpu")
    return root


def _register_bare_packages() -> None:
    """Register bare module objects for the torch-importing packages, ideally before onnxruntime loads.

    onnxruntime's native extension imports ``onnxruntime.training`` while loading, and
    its ``__init__`` probes ``training.ortmodule`` (torch) to report its build: both
    are skipped when this runs first. Packages already imported are left alone.
    """
    first = "onnxruntime" not in sys.modules
    root = _onnxruntime_root()
    for name in _BARE_PACKAGES:
        if name in sys.modules:
            continue
        folder = root / name.rsplit(".", 1)[1]
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        module.__package__ = name
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        module.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = module
    if first and _ORTMODULE not in sys.modules:  # the build probe then fails softly; devices never use ORTModule
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]


def import_onnxruntime() -> types.ModuleType:
    """``import onnxruntime``, skipping the training build's torch probe when that build is installed.

    For code that needs only the inference API (the portable backend): with plain
    onnxruntime this is a plain import.
    """
    if "onnxruntime" not in sys.modules:
        try:
            _register_bare_packages()
        except OrtUnavailableError:
            pass  # plain onnxruntime (no training folder) or none: nothing to skip
    return importlib.import_module("onnxruntime")


def training_module(name: str) -> types.ModuleType:
    """Import ``onnxruntime.training.<name>`` (``api``, ``artifacts``, ``onnxblock``) without torch."""
    _register_bare_packages()
    try:
        module = importlib.import_module(f"onnxruntime.training.{name}")
    except ImportError as exc:
        raise OrtUnavailableError(f"cannot import onnxruntime.training.{name}: {exc}") from exc
    _link_parents()
    return module


def _link_parents() -> None:
    """Expose the bare packages as attributes (``onnxruntime.training``), as a normal import would."""
    import onnxruntime

    for name in _BARE_PACKAGES:
        attr = name.rsplit(".", 1)[1]
        if not hasattr(onnxruntime, attr):
            setattr(onnxruntime, attr, sys.modules[name])


def ort_errors() -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises (its pybind errors do not derive from RuntimeError); for
    plain onnxruntime and the training build alike."""
    import_onnxruntime()
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    found = [getattr(state, name) for name in names if isinstance(getattr(state, name, None), type)]
    return (RuntimeError, *found)
