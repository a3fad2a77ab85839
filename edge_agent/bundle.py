"""Artifact bundles: a directory packed as a deterministic, uncompressed tar.

The same directory always packs to the same bytes (sorted names, zeroed
mtime/uid/gid, fixed modes), so a bundle's sha256 names its content. Unpacking
trusts nothing: absolute paths, ``..`` components, links and device files are
refused. An :class:`ArtifactStore` keeps unpacked bundles by digest.

Stdlib only (the agent imports this before it knows which backend it has).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from edge_agent.errors import EdgeAgentError

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FILE_MODE = 0o644
_CHUNK = 1 << 20


class BundleError(EdgeAgentError):
    """A bundle cannot be packed, unpacked or stored (bad digest, unsafe member, I/O error)."""


def sha256_hex(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _bundle_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (posix relative name, path), sorted by name."""
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            if path.is_symlink():
                raise BundleError(f"refusing to pack symlink {path}")
        for name in filenames:
            path = here / name
            if not path.is_file():
                raise BundleError(f"refusing to pack non-regular file {path}")
            files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def pack_dir(path: Path) -> bytes:
    """Pack every regular file under ``path`` into deterministic uncompressed tar bytes."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"not a directory: {root}")
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


def _safe_member_name(member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path, or BundleError if it could escape the destination."""
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"bundle member {member.name!r} is not a regular file or directory")
    name = PurePosixPath(member.name)
    if not member.name or "\\" in member.name or name.is_absolute():
        raise BundleError(f"bundle member has an unsafe name: {member.name!r}")
    if any(part in ("..", "") for part in name.parts) or name == PurePosixPath("."):
        raise BundleError(f"bundle member has an unsafe name: {member.name!r}")
    return name


def unpack_bytes(blob: bytes, dest: Path) -> None:
    """Unpack a bundle into ``dest`` (created if missing), refusing unsafe members."""
    target = Path(dest)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(blob), mode="r:")
    except tarfile.TarError as exc:
        raise BundleError(f"not a tar bundle: {exc}") from exc
    with tar:
        members = tar.getmembers()
        names = [_safe_member_name(member) for member in members]  # validate all before writing
        if len(set(names)) != len(names):
            raise BundleError("bundle has duplicate member names")
        target.mkdir(parents=True, exist_ok=True)
        for member, name in zip(members, names, strict=True):
            out = target.joinpath(*name.parts)
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise BundleError(f"cannot read bundle member {member.name!r}")
            with source, out.open("wb") as handle:
                shutil.copyfileobj(source, handle, _CHUNK)


def fill_atomically(target: Path, fill: Callable[[Path], None]) -> bool:
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


class ArtifactStore:
    """Unpacked bundles kept by sha256 under ``root`` (``root/<sha>/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        """Where the bundle with digest ``sha`` lives (whether or not it is there)."""
        if not _SHA256_RE.fullmatch(sha):
            raise BundleError(f"not a lower-case sha256 hex digest: {sha!r}")
        return self.root / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_dir()

    def put(self, sha: str, blob: bytes) -> Path:
        """Verify ``blob`` against ``sha`` and unpack it atomically; return its directory."""
        final = self.path(sha)
        actual = sha256_hex(blob)
        if actual != sha:
            raise BundleError(f"bundle digest mismatch: expected {sha}, got {actual}")
        if final.is_dir():
            return final
        try:
            fill_atomically(final, lambda staging: unpack_bytes(blob, staging))
        except OSError as exc:
            raise BundleError(f"cannot store bundle {sha}: {exc}") from exc
        return final
        logger.info("stored bundle %s (%d bytes)", sha, len(blob))
        return final
