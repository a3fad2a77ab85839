"""The transfer benchmark's pure parts: one run's figures from its two ends, medians, the summary rows."""

from __future__ import annotations

from tools.bench_transfer import MIB, median_of, run_record, summarize

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
