"""A foreign MQTT client fuzzes every inbox and status topic during a whole trial (tools/fuzz.py): the trial
ends as it would have without it, every process stays up, and every refusal is counted by reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from tests.integration.test_trials import hop_lines, run, small
from tools.fuzz import FAMILIES, FuzzClient

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(600)]
PAYLOADS = 10_000
ROUNDS = 80  # 60 rounds took 35 s on a quiet machine: too short for PAYLOADS while the fuzzer managed only 200/s


def test_ten_thousand_malformed_payloads_change_nothing(mosquitto: RunningBroker, tmp_path: Path) -> None:
    # 3 agents x ROUNDS rounds with 32 KiB chunks: 0.3-1 s per round clean depending on the machine. The fuzzer starts before the
    # trial and publishes at up to 450/s until the trial ends (on a loaded 2-core machine it managed ~270/s);
    # at least 10,000 payloads must have gone out by then. Two same-seed runs hand on bit-identical models at
    # every hop (measured: seeded partitions, initial model and training), so the fuzzed run must produce
    # the same digests.
    config = small(agents=3, rounds=ROUNDS, **{"transfer.chunk_bytes": 32768})
    clean = run(config, tmp_path / "clean", mosquitto.url)
    fuzzer = FuzzClient(
        mosquitto.url, seed=2026, count=5 * PAYLOADS, rate=450, agents=["agent-0", "agent-1", "agent-2"]
    )
    fuzzer.start()
    try:
        fuzzed = run(config, tmp_path / "fuzzed", mosquitto.url)
        report = fuzzer.report.as_dict()  # what went out while the trial ran
    finally:
        fuzzer.close()
    (tmp_path / "fuzz.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"fuzz": report, "trial_s": {"clean": clean.get("trial_s"), "fuzzed": fuzzed.get("trial_s")},
                      "rejections": fuzzed.get("rejections")}))  # fmt: skip
    assert report["count"] >= PAYLOADS, f"the trial ended after {report['count']} payloads ({report['duration_s']} s)"
    assert set(report["families"]) == set(FAMILIES) and report["observed"] > 100
    assert len(report["topics"]) >= 7  # the coordinator's inbox, 3 agent inboxes, 3 status topics
    # the same trial: every hop handed on the same bytes, the same final accuracy
    assert [h["model_sha256"] for h in hop_lines(tmp_path / "fuzzed")] == [
        h["model_sha256"] for h in hop_lines(tmp_path / "clean")
    ]
    assert fuzzed["final_test_accuracy"] == clean["final_test_accuracy"]
    assert [a["hops"] for a in fuzzed["agents"]] == [ROUNDS] * 3
    # every receiver counted its refusals by reason; none was a bug
    rejections = fuzzed["rejections"]
    assert list(rejections) == ["coordinator", "agent-0", "agent-1", "agent-2"]
    for who, counts in rejections.items():
        assert sum(counts.values()) > 500 and "internal" not in counts, (who, counts)
        assert {"malformed", "too_deep", "bad_number", "version"} <= set(counts), (who, counts)
    assert all(not counts for counts in clean["rejections"].values())
    # no traceback or ERROR in any agent log: checked for every integration test (tests/integration/conftest.py)
