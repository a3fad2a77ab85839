"""A whole trial over the network test bed (tools/netbed.py): one agent behind 1 Mbit/s, 5 % loss and
200 ms each way, the others on a clean link; real mosquitto, agents and coordinator, each on its own
network namespace. Needs root, iproute2 (``ip netns``, veth, bridge) and tc with htb and cls_bpf; it
skips with the missing piece named otherwise (``pytest -ra`` prints it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.netbed import probe
from tools.netbed_links import LinkSpec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.broker,
    pytest.mark.ort,
    pytest.mark.torch,
    pytest.mark.timeout(900),
]

TRIAL = Path(__file__).resolve().parents[2] / "examples" / "slow-link.toml"
SLOW = LinkSpec(rate_kbit=1000, loss=0.05, delay_ms=200.0)


@pytest.fixture(scope="module")
def netbed_available() -> None:
    facts = probe()
    if facts["missing"]:
        pytest.skip("netns test bed NOT RUN: " + "; ".join(facts["missing"]))


def test_a_trial_with_one_agent_behind_a_slow_lossy_delayed_link_completes(
    netbed_available: None, tmp_path: Path
) -> None:
    from tools.netbed_trial import run_trial

    summary = run_trial(TRIAL, {1: SLOW}, tmp_path, timeout_s=600.0)
    assert summary["hops"] == 2 and summary["final_test_accuracy"] > 0.15  # trained: well above chance (0.1)
    hops = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["agent"] for h in hops] == ["agent-0", "agent-1"]  # the slow agent got the model and passed it on
    link = summary["netbed"]["measured"]["agent-1"]
    model_bytes = hops[0]["model_bytes"]
    for direction in ("up", "down"):  # the model crossed the slow link both ways, and packets were lost
        assert link[direction]["bytes"] > model_bytes
        assert 0.02 < link[direction]["loss"] < 0.10, link
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    assert "giving up on transfer" not in logs and "never acknowledged" not in logs
