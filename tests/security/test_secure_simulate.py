"""``simulate --secure``: the same small trial over the provisioned TLS broker with signed messages ends
where the plain one does."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from coordinator.config import load_trial
from coordinator.simulate import SimOptions, simulate

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]


def test_a_secure_simulation_matches_the_plain_one(mosquitto: RunningBroker, tmp_path: Path) -> None:
    config = load_trial(None, {"model": "mlp", "agents": 2, "rounds": 1, "samples_per_agent": 400})
    plain = simulate(config, tmp_path / "plain", SimOptions(broker=mosquitto.url, show_progress=False))
    secure = simulate(config, tmp_path / "secure", SimOptions(show_progress=False, secure=True))
    assert secure["secure"] is True and (tmp_path / "secure" / "secure" / "broker" / "mosquitto.conf").exists()
    assert abs(secure["final_test_accuracy"] - plain["final_test_accuracy"]) <= 0.02
    for agent in ("agent-0", "agent-1"):
        log = (tmp_path / "secure" / "logs" / f"{agent}.log").read_text()
        assert "online at mqtts://" in log and "refused" not in log
