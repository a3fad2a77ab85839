"""The agent's last model on disk: one safetensors file, replaced atomically.

After each hop the agent keeps the model it handed on (as receivers decode it), with the trial id,
the hop, the group versions and a digest of every tensor in the file's metadata. The next delta it receives is computed
against that copy. Writes go to a temporary file that is flushed, fsynced and renamed over the old
one, so a crash leaves either the old copy or the new one, never half a file. Reads map the file and
return read-only views; a missing, foreign or damaged file reads as "no copy" (the agent then asks
for the whole model).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.protocol.codec import decode_views, tensor_parts
from edge_agent.protocol.delta import Base
from edge_agent.protocol.errors import ProtocolError

log = logging.getLogger(__name__)
_FILE = "last_model.safetensors"


@dataclass(frozen=True)
class CachedModel:
    trial_id: str
    hop: int  # the hop whose output this is
    base: Base
    digest: str  # model_digest of the tensors as they were handed on (checked before a resend)


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / _FILE

    def save(
        self, trial_id: str, hop: int, versions: Mapping[str, int], tensors: Mapping[str, np.ndarray], digest: str
    ) -> None:
        """Replace the cached copy with ``tensors`` (float32), crash-safe; ``digest``: their model_digest."""
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"trial_id": trial_id, "hop": str(hop), "versions": json.dumps(dict(versions)), "digest": digest}
        tmp = self.path.with_name(f".{_FILE}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as fh:
                for part in tensor_parts(tensors, "none", meta):  # streamed: no whole file in memory
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def load(self, trial_id: str) -> CachedModel | None:
        """The cached copy for ``trial_id`` (views into a read-only map), or None."""
        try:
            with self.path.open("rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # missing or empty file
            log.info("no cached model at %s (%s)", self.path, type(exc).__name__)
            return None
        try:
            tensors, meta = decode_views(memoryview(mapped))
            if meta.get("trial_id") != trial_id:
                log.info("cached model belongs to trial %r, not %r", meta.get("trial_id"), trial_id)
                return None
            versions = {str(g): int(v) for g, v in json.loads(meta["versions"]).items()}
            return CachedModel(trial_id, int(meta["hop"]), Base(versions, tensors), str(meta["digest"]))
        except (ProtocolError, KeyError, ValueError, TypeError, AttributeError) as exc:
            log.warning("cached model %s is damaged (%s); ignoring it", self.path, exc)
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
