"""Received artifact bundles: safe unpacking, digest-checked atomic storage (packing: tests/coordinator/test_bundle.py)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from coordinator.build.bundle import pack_dir
from edge_agent.bundle import ArtifactStore, BundleError, unpack_bytes
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol.transfer import sha256_hex


def make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "b.onnx").write_bytes(b"\x00\x01graph")
    (root / "a.json").write_text('{"format": 1}\n')
    (root / "sub" / "c.bin").write_bytes(os.urandom(3000))
    return root


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            if member.isfile():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../evil"),
        tarfile.TarInfo("/etc/evil"),
        tarfile.TarInfo("ok/../../evil"),
    ],
    ids=["parent", "absolute", "nested-parent"],
)
def test_unpack_refuses_path_traversal(tmp_path: Path, member: tarfile.TarInfo) -> None:
    with pytest.raises(BundleError, match="unsafe"):
        unpack_bytes(_tar(member), tmp_path / "out")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_unpack_refuses_links_and_special_files(tmp_path: Path, kind: bytes) -> None:
    member = tarfile.TarInfo("link")
    member.type = kind
    member.linkname = "/etc/passwd"
    with pytest.raises(BundleError, match="not a regular file"):
        unpack_bytes(_tar(tarfile.TarInfo("fine"), member), tmp_path / "out")
    assert not (tmp_path / "out" / "fine").exists()  # validated before anything is written


def test_garbage_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        unpack_bytes(b"not a tar at all" * 100, tmp_path / "out")
    assert issubclass(BundleError, EdgeAgentError)


def test_store_verifies_the_digest_and_unpacks_atomically(tmp_path: Path) -> None:
    blob = pack_dir(make_dir(tmp_path / "src"))
    sha = sha256_hex(blob)
    store = ArtifactStore(tmp_path / "store")
    assert not store.has(sha)
    with pytest.raises(BundleError, match="mismatch"):
        store.put(sha, blob + b"\0")
    assert not store.has(sha)
    path = store.put(sha, blob)
    assert store.has(sha) and path == store.path(sha) and (path / "sub" / "c.bin").is_file()
    assert store.put(sha, blob) == path  # idempotent
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [sha]  # no staging leftovers


def test_store_refuses_bad_digest_strings(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for bad in ("../x", "ABC", "0" * 63, "g" * 64):
        with pytest.raises(BundleError):
            store.path(bad)


def test_failed_unpack_leaves_no_entry(tmp_path: Path) -> None:
    blob = _tar(tarfile.TarInfo("../evil"))
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(BundleError):
        store.put(sha256_hex(blob), blob)
    assert list((tmp_path / "store").iterdir()) == []
