"""Artifact bundles: deterministic packing, safe unpacking, digest-checked atomic storage."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from edge_agent.bundle import ArtifactStore, BundleError, pack_dir, sha256_hex, unpack_bytes
from edge_agent.errors import EdgeAgentError


def _make_dir(root: Path) -> Path:
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


def test_packing_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    source = _make_dir(tmp_path / "src")
    blob = pack_dir(source)
    os.utime(source / "a.json", (12345, 12345))
    (source / "b.onnx").chmod(0o600)
    assert pack_dir(source) == blob  # mtimes and modes do not leak into the bytes
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.json", "b.onnx", "sub/c.bin"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and not m.name.startswith("/") for m in members)
    unpack_bytes(blob, tmp_path / "out")
    for name in ("a.json", "b.onnx", "sub/c.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()


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


def test_pack_refuses_symlinks(tmp_path: Path) -> None:
    source = _make_dir(tmp_path / "src")
    (source / "link").symlink_to(source / "a.json")
    with pytest.raises(BundleError, match="symlink"):
        pack_dir(source)


def test_garbage_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        unpack_bytes(b"not a tar at all" * 100, tmp_path / "out")
    assert issubclass(BundleError, EdgeAgentError)


def test_store_verifies_the_digest_and_unpacks_atomically(tmp_path: Path) -> None:
    blob = pack_dir(_make_dir(tmp_path / "src"))
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
