"""Received artifact bundles: verified, unpacked and kept by digest.

A bundle is a directory packed as a deterministic, uncompressed tar (packed by the coordinator,
:func:`coordinator.build.bundle.pack_dir`), so its sha256 names its content. Unpacking trusts
nothing: absolute paths, ``..`` components, links and device files are refused. An
:class:`ArtifactStore` keeps unpacked bundles by digest.

Stdlib and the protocol only (the agent imports this before it knows which backend it has).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.transfer import sha256_hex

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class BundleError(EdgeAgentError):
    """A bundle cannot be unpacked or stored (bad digest, unsafe member, I/O error)."""


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
            _unpack_atomically(blob, final)
        except OSError as exc:
            raise BundleError(f"cannot store bundle {sha}: {exc}") from exc
        return final


def _unpack_atomically(blob: bytes, final: Path) -> None:
    """Unpack into private staging next to ``final``, then rename: readers never see half a bundle."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name[:12]}-", dir=final.parent))
    try:
        unpack_bytes(blob, staging)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # else a concurrent put stored the same content first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
