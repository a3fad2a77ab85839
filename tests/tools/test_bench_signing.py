"""tools/bench_signing.py: one tiny run writes its JSON with plausible figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")


def test_bench_signing_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import bench_signing

    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["bench_signing", "--chunk-kib", "4", "--repeats", "3", "--out", str(out)])
    bench_signing.main()
    result = json.loads(out.read_text())
    assert result["control"]["extra_bytes"] > 64  # a 64-byte signature in base64 plus the sequence number
    assert result["chunk_4kib"]["receive_us"] > 0
