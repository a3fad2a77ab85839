"""A language model's fine-tuning trial: a real mosquitto, four agent processes with one or two of Jane
Austen's novels each (by-source), real ONNX Runtime training of transformer-block segments, a base
model pretrained on the start of every novel, perplexity on every novel's held-out test part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker
from coordinator.config import load_trial
from coordinator.simulate import SimOptions, simulate
from coordinator.text.austen import TextDataError, find_austen_dir

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]


def test_four_agents_fine_tune_a_pretrained_gpt_below_its_base_on_every_novel(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    pytest.importorskip("rdata")
    try:
        find_austen_dir()
    except TextDataError:
        pytest.skip("r-cran-janeaustenr not unpacked (tools/setup.sh does it)")
    tiny = {"model": "gpt", "dataset": "austen", "partition": "by-source", "agents": 4, "rounds": 1,
            "train.max_steps": 6, "train.lr": 0.002, "lm.seq_len": 32, "lm.pretrain_steps": 20,
            "lm.test_per_source": 12, "lm.sample_tokens": 8, "lm.cache_dir": str(tmp_path / "cache")}  # fmt: skip
    config = load_trial(None, tiny)
    summary = simulate(config, tmp_path / "run", SimOptions(broker=mosquitto.url, show_progress=False))
    assert summary["hops"] == 4 and [a["hops"] for a in summary["agents"]] == [1, 1, 1, 1]
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.safetensors"))) == 1
    per_source = summary["per_source"]
    assert len(per_source) == 6 and summary["test_sequences_per_source"] == {n: 12 for n in per_source}
    worse = {name: p for name, p in per_source.items() if not p["final"] < p["base"]}
    assert not worse, f"fine-tuning did not lower perplexity on {worse}"
    assert summary["final_perplexity"] < summary["base_perplexity"] < 259
    hops = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(h["agent"] for h in hops) == ["agent-0", "agent-1", "agent-2", "agent-3"]
    assert [s["prompt"] for s in summary["samples"]] and (tmp_path / "run" / "samples.md").is_file()
    assert (tmp_path / "run" / "lm_report.md").read_text().count("->") >= 7
    assert (tmp_path / "run" / "base_model.onnx").is_file() and (tmp_path / "run" / "final_model.onnx").is_file()
