"""Fine-tuning an OPT checkpoint (``opt:PATH``) in a trial: a tiny random OPT with a byte-level BPE trained
in its directory, a real mosquitto, agent processes on both backends, Jane Austen's novels tokenized with
the checkpoint's tokenizer. The base is the checkpoint itself (its perplexity is checked against Hugging
Face's own model in torch); being random, its perplexity is about its vocabulary size, so that fine-tuning
lowers it says only that training reached the model, not that it learned much."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import RunningBroker
from coordinator.config import TrialConfig, load_trial
from coordinator.simulate import SimOptions, simulate
from coordinator.text.austen import TextDataError, find_austen_dir, load_austen

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]

VOCAB, SEQ = 400, 16


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer OPT (vocabulary 400) with a BPE of 400 tokens trained on the novels' openings."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("rdata")
    try:
        find_austen_dir()
    except TextDataError:
        pytest.skip("r-cran-janeaustenr not unpacked (tools/setup.sh does it)")
    from tests.coordinator.opt_tiny import save_bpe, train_bpe, write_opt

    directory = write_opt(tmp_path_factory.mktemp("opt-bpe"), VOCAB)
    save_bpe(train_bpe([text[:40_000] for text in load_austen().values()], VOCAB), directory)
    return directory


def _config(opt_dir: Path, tmp_path: Path, **extra: Any) -> TrialConfig:
    settings = {"model": f"opt:{opt_dir}", "dataset": "austen", "partition": "by-source", "agents": 2, "rounds": 1,
                "train.max_steps": 4, "train.lr": 0.01, "lm.seq_len": SEQ, "lm.test_per_source": 8,
                "lm.sample_tokens": 6, "lm.cache_dir": str(tmp_path / "cache")}  # fmt: skip
    return load_trial(None, settings | extra)


def _checkpoint_perplexity(opt_dir: Path, config: TrialConfig) -> float:
    """The checkpoint's test perplexity by Hugging Face's OPTForCausalLM (torch) on the trial's test tokens."""
    import torch
    import transformers

    from coordinator.lm_trial import checkpoint_workload

    workload, _ = checkpoint_workload(config)
    model = transformers.OPTForCausalLM.from_pretrained(opt_dir, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(workload.x)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(workload.y).reshape(-1))
    return math.exp(float(loss))


def test_a_snake_trial_fine_tunes_the_checkpoint_with_its_tokenizer(
    mosquitto: RunningBroker, opt_dir: Path, tmp_path: Path
) -> None:
    config = _config(opt_dir, tmp_path)
    options = SimOptions(broker=mosquitto.url, show_progress=False, backends=("ort", "portable"))
    summary = simulate(config, tmp_path / "run", options)
    assert summary["hops"] == 2 and summary["base_model"] == f"checkpoint {opt_dir}"
    assert summary["tokenizer"] == f"Hugging Face tokenizer tokenizer.json ({VOCAB} tokens)"
    assert not (tmp_path / "cache").exists()  # nothing pretrained
    assert summary["base_perplexity"] == pytest.approx(_checkpoint_perplexity(opt_dir, config), rel=1e-4)
    assert 0.7 * VOCAB < summary["base_perplexity"] < 1.5 * VOCAB  # random weights: about the vocabulary size
    per_source = summary["per_source"]
    assert len(per_source) == 6 and all(p["final"] < p["base"] for p in per_source.values()), per_source
    assert summary["final_perplexity"] < summary["base_perplexity"] and summary["seq_len"] == SEQ
    for part in sorted((tmp_path / "run" / "data").glob("agent-*.npz")):  # what the agents train on
        with np.load(part) as npz:
            assert (int(npz["vocab_size"]), int(npz["pad_id"])) == (VOCAB, 1)
            assert npz["x_train"].max() > 259  # BPE merges, not bytes
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == [s["prompt"] for s in summary["samples"]] and len(samples) == 3
    assert all(s["base"].startswith(s["prompt"]) and s["final"].startswith(s["prompt"]) for s in samples)
    assert "It is a truth universally acknowledged" in (tmp_path / "run" / "samples.md").read_text()
    assert (tmp_path / "run" / "final_model.onnx").is_file() and (tmp_path / "run" / "lm_report.md").is_file()


def test_fedavg_with_lora_fine_tunes_the_checkpoint(mosquitto: RunningBroker, opt_dir: Path, tmp_path: Path) -> None:
    config = _config(opt_dir, tmp_path, algorithm="fedavg", **{"lora.rank": 4, "lora.targets": "q_proj,v_proj"})
    summary = simulate(config, tmp_path / "run", SimOptions(broker=mosquitto.url, show_progress=False))
    assert summary["algorithm"] == "fedavg" and summary["hops"] == 2
    assert summary["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    assert summary["final_perplexity"] < summary["base_perplexity"]
    import onnx

    final = onnx.load(tmp_path / "run" / "final_model.onnx")
    assert not any("lora" in init.name for init in final.graph.initializer)  # merged into the checkpoint's weights
