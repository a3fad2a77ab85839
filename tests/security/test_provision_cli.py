"""``snake-coordinator provision`` as a user runs it: output, modes, re-runs, bad ids."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.cli import main
from coordinator.provision_cli import provisioned_broker


@pytest.mark.expect_errors  # the refused id is logged at ERROR by the CLI guard
def test_provision_twice_then_revoke(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "keys"
    runner = CliRunner()
    first = runner.invoke(main, ["provision", "--out", str(out), "--agents", "a1,a2", "--port", "18883", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["added"] == ["a1", "a2"]
    keys = [p for p in out.rglob("*.key")]
    assert len(keys) == 8  # CA, broker, 3 clients, 3 signing keys
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)
    assert "PRIVATE" not in first.output
    again = json.loads(runner.invoke(main, ["provision", "--out", str(out), "--agents", "a3", "--json"]).output)
    assert again["added"] == ["a3"] and again["kept"] == ["a1", "a2"]
    assert provisioned_broker(out / "coordinator") == "mqtts://localhost:8883"  # the latest --port
    gone = json.loads(runner.invoke(main, ["provision", "--out", str(out), "--revoke", "a2", "--json"]).output)
    assert gone["revoked"] == ["a2"] and not (out / "agents" / "a2").exists()
    bad = runner.invoke(main, ["provision", "--out", str(out), "--agents", "a/b"])
    assert bad.exit_code == 3 and "invalid agent id 'a/b'" in caplog.text
