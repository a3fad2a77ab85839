"""The transfer benchmark: its pure parts (one run's figures, medians, the summary rows) and one real 32 MB run."""

from __future__ import annotations

import pytest

from coordinator.broker import RunningBroker
from tools.bench_transfer import MIB, median_of, run_once, run_record, summarize

SIZE = 64 * MIB


def end(delta_mb: float, **extra: object) -> dict[str, object]:
    return {"delta_mb": delta_mb, "peak_phase": "receiving", **extra}


def test_a_run_reports_throughput_and_rss_as_multiples_of_the_payload() -> None:
    run = run_record(SIZE, end(128.0, seconds=0.5, sha256="ab"), end(64.0, size=SIZE, sha256="ab"))
    assert run["mb_s"] == 128.0
    assert (run["sender_rss_x"], run["receiver_rss_x"]) == (2.0, 1.0)
    assert "error" not in run


def test_a_payload_that_arrives_changed_is_a_failed_run() -> None:
    run = run_record(SIZE, end(64.0, seconds=0.5, sha256="ab"), end(64.0, size=SIZE, sha256="cd"))
    assert run["error"] == "payload arrived changed" and run["mb_s"] is None
    assert median_of([run])["failed"] == 1


def test_medians_skip_failed_runs() -> None:
    runs = [
        {"mb_s": v, "sender_rss_x": 1.0, "receiver_rss_x": x} for v, x in ((100.0, 1.1), (300.0, 1.3), (200.0, 1.2))
    ]
    runs.append({"error": "no ack", "mb_s": None, "sender_rss_x": None, "receiver_rss_x": None})
    assert median_of(runs) == {"mb_s": 200.0, "sender_rss_x": 1.0, "receiver_rss_x": 1.2, "failed": 1}


def test_summary_compares_each_mqtt_case_with_the_raw_baselines_of_its_size() -> None:
    def case(transport: str, size_mb: int, mb_s: float, chunk: int | None = None) -> dict[str, object]:
        median = {"mb_s": mb_s, "sender_rss_x": 2.0, "receiver_rss_x": 1.0, "failed": 0}
        return {"transport": transport, "size_mb": size_mb, "chunk_bytes": chunk, "median": median}

    cases = [case("raw", 64, 1000.0), case("raw-sha", 64, 400.0), case("mqtt", 64, 200.0, MIB),
             case("raw", 512, 800.0), case("mqtt", 512, 400.0, 4 * MIB)]  # fmt: skip
    rows = summarize(cases)
    assert [(r["size_mb"], r["chunk_kib"], r["ratio"], r["ratio_sha"]) for r in rows] == [
        (64, 1024, 0.2, 0.5),
        (512, 4096, 0.5, None),
    ]


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_a_32_mb_transfer_through_mosquitto_arrives_intact_with_both_ends_memory_bounded(
    mosquitto: RunningBroker,
) -> None:
    """The real path (Outbox -> MqttLink -> mosquitto -> MqttLink -> Reassembler) between two processes.

    Each end's RSS above its baseline may exceed the payload (the sender's own bytes; the receiver's
    reassembled copy) by a bounded buffer: with 2 MiB of publish window and inbox budget, measured
    +4.7 MiB (sender) and +5.8 MiB (receiver); before frames were encoded on demand and the inbox had a
    byte budget, +42.8 and +14-17 MiB. The bound below leaves twice the measured room."""
    size, buffer = 32 * MIB, 2 * MIB
    run = run_once("mqtt", size, MIB, url=mosquitto.url, timeout_s=120, buffer_bytes=buffer)
    assert "error" not in run, run  # run_record compares the size and sha256 both ends saw
    for end_ in ("sender", "receiver"):
        extra_mb = run[end_]["delta_mb"] - size / MIB
        assert extra_mb <= 12.0, f"{end_} held {extra_mb:.1f} MiB beyond the payload ({run[end_]})"
