"""Bundles as the coordinator packs them: deterministic bytes that the agent unpacks to the same files."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from coordinator.build.bundle import PackError, fill_atomically, pack_dir
from edge_agent.bundle import unpack_bytes
from tests.edge_agent.test_bundle import make_dir


def test_packing_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src")
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


def test_pack_refuses_symlinks(tmp_path: Path) -> None:
    source = make_dir(tmp_path / "src")
    (source / "link").symlink_to(source / "a.json")
    with pytest.raises(PackError, match="symlink"):
        pack_dir(source)


def test_fill_atomically_leaves_nothing_behind_when_the_fill_fails(tmp_path: Path) -> None:
    def fail(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise PackError("generator failed")

    with pytest.raises(PackError):
        fill_atomically(tmp_path / "cache" / "key", fail)
    assert list((tmp_path / "cache").iterdir()) == []
    assert fill_atomically(tmp_path / "cache" / "key", lambda staging: (staging / "f").write_text("x"))
    assert not fill_atomically(tmp_path / "cache" / "key", lambda staging: (staging / "f").write_text("x"))
