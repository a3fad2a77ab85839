"""Bundles as the coordinator makes them: a built directory, written atomically, packed into bytes.

A directory packs as a deterministic, uncompressed tar: the same directory always packs to the
same bytes (sorted names, zeroed mtime/uid/gid, fixed modes), so a bundle's sha256 names its
content. Agents verify and unpack it (:class:`edge_agent.bundle.ArtifactStore`).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from coordinator.errors import CoordinatorError
from edge_agent.protocol.manifest import MANIFEST_NAME, SegmentManifest

_FILE_MODE = 0o644


class PackError(CoordinatorError):
    """A directory cannot be packed (not a directory, or it holds links or special files)."""


def _bundle_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (posix relative name, path), sorted by name."""
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            if path.is_symlink():
                raise PackError(f"refusing to pack symlink {path}")
        for name in filenames:
            path = here / name
            if not path.is_file():
                raise PackError(f"refusing to pack non-regular file {path}")
            files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def pack_dir(path: Path) -> bytes:
    """Pack every regular file under ``path`` into deterministic uncompressed tar bytes."""
    root = Path(path)
    if not root.is_dir():
        raise PackError(f"not a directory: {root}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, file_path in _bundle_files(root):
            info = tarfile.TarInfo(name)
            info.size = file_path.stat().st_size
            info.mtime = 0
            info.mode = _FILE_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with file_path.open("rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def write_manifest(directory: Path, manifest: SegmentManifest) -> Path:
    """Write ``manifest`` as the bundle's ``manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def fill_atomically(target: Path, fill: Callable[[Path], object]) -> bool:
    """Let ``fill`` write a directory in private staging next to ``target``, then rename it into place.

    Readers never see a half-written directory. Returns False if a concurrent writer put ``target``
    there first (same content by construction: directories are named by content hash). Errors of
    ``fill`` propagate; the staging directory never survives.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:12]}-", dir=target.parent))
    try:
        fill(staging)
        os.rename(staging, target)
        return True
    except OSError:
        if target.is_dir():
            return False
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
