"""A language model's fine-tuning run, coordinator side: the corpus split, the pretrained base's cache,
text trial settings, and the summary's perplexity fields, samples and report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import load_trial
from coordinator.errors import ConfigError
from coordinator.partitions import validation_cap

SEQ = 8


def toy_dataset():  # type: ignore[no-untyped-def]
    from coordinator.text.sequences import build_token_dataset

    texts = {name: (name + " walked to the village and back again. ") * 30 for name in ("Elinor", "Emma", "Anne")}
    return build_token_dataset("toy", texts, seq_len=SEQ)


def test_text_trials_get_small_defaults_unless_set(tmp_path: Path) -> None:
    config = load_trial(None, {"model": "gpt", "dataset": "austen"})
    assert (config.rounds, config.train.batch_size, config.train.max_steps) == (2, 16, 40)
    assert config.eval_every_round  # the perplexity curve
    path = tmp_path / "t.toml"
    path.write_text('[trial]\nmodel = "gpt"\ndataset = "austen"\nrounds = 3\n[lm]\nseq_len = 32\n')
    config = load_trial(path, {"train.max_steps": 7})
    assert (config.rounds, config.train.batch_size, config.train.max_steps, config.lm.seq_len) == (3, 16, 7, 32)
    image = load_trial(None, {"model": "cnn"})
    assert (image.rounds, image.train.batch_size, image.train.max_steps) == (4, 64, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "cnn", "dataset": "austen"}, "dataset austen is text"),
        ({"model": "gpt"}, "model gpt is a language model"),
        ({"model": "gpt", "dataset": "austen", "algorithm": "split"}, "split learning is not built"),
        ({"model": "gpt", "dataset": "austen", "lm.pretrain_fraction": 1.0}, "lm.pretrain_fraction"),
        ({"model": "gpt", "dataset": "austen", "lm.base_model": ""}, "lm.base_model"),
    ],
)
def test_text_trial_mismatches_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_trial(None, overrides)


def test_validation_share_follows_what_a_hop_trains() -> None:
    config = load_trial(None, {"model": "gpt", "dataset": "austen"})  # 40 steps of 16, val_fraction 0.1
    assert validation_cap(config, 10_000) == math.ceil(640 * 0.1 / 0.9)
    assert validation_cap(config, 20) == 16  # at least one batch
    assert validation_cap(dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=0)), 900) == 100


def test_the_split_holds_back_the_start_of_every_source_for_pretraining() -> None:
    from coordinator.lm_trial import split_corpus

    ds = toy_dataset()
    split = split_corpus(ds, 0.25)
    for source in range(3):
        train = ds.x_train[ds.y_train == source]
        cut = round(len(train) * 0.25)
        assert np.array_equal(split.finetune.x_train[split.finetune.y_train == source], train[cut:])
    assert len(split.pretrain) + len(split.finetune.x_train) == len(ds.x_train)
    assert split.finetune.x_test is ds.x_test  # the test parts stay held out from both


@pytest.mark.torch
def test_the_pretrained_base_is_cached_by_its_settings_and_tokens(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from coordinator.pretrain import PretrainSettings, cached_base, load_state, pretrain_key

    ds = toy_dataset()
    settings = PretrainSettings("gpt", ds.vocab_size, SEQ, steps=3, batch_size=4, lr=1e-3, seed=0)
    seen: list[int] = []
    tensors, path, cached = cached_base(settings, ds.x_train, ds.pad_id, tmp_path, lambda s, n, loss: seen.append(s))
    assert not cached and seen == [1, 2, 3] and path.parent == tmp_path / "pretrain"
    assert json.loads(path.with_suffix(".json").read_text())["steps"] == 3
    again, path2, cached2 = cached_base(settings, ds.x_train, ds.pad_id, tmp_path, lambda *a: seen.append(0))
    assert cached2 and path2 == path and seen == [1, 2, 3]  # read back, not trained again
    assert all(np.array_equal(tensors[k], again[k]) for k in tensors)
    key = pretrain_key(settings, ds.x_train)
    assert pretrain_key(dataclasses.replace(settings, steps=4), ds.x_train) != key
    assert pretrain_key(settings, ds.x_train[1:]) != key  # other tokens, another base
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_state(tmp_path / "bad.safetensors")


@pytest.mark.torch
@pytest.mark.ort
def test_summary_reports_perplexity_per_source_samples_and_a_report(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from coordinator import lm_report
    from coordinator.evaluate import finalize
    from coordinator.export import TASK_CAUSAL_LM, model_tensors
    from coordinator.lm_trial import LmWorkload, split_corpus
    from coordinator.pretrain import PretrainSettings, train_lm
    from models import InputSpec, build_model

    ds = toy_dataset()
    split = split_corpus(ds, 0.5)
    config = load_trial(None, {"model": "gpt", "dataset": "austen", "lm.test_per_source": 3, "lm.sample_tokens": 5})
    settings = PretrainSettings("gpt", ds.vocab_size, SEQ, steps=30, batch_size=8, lr=3e-3, seed=0)
    trained, _ = train_lm(settings, split.finetune.x_train, ds.pad_id)
    model = build_model("gpt", InputSpec(num_classes=ds.vocab_size, seq_len=SEQ))
    workload = LmWorkload(config, split.finetune, None, "none")
    assert len(workload.x) == 9 and workload.spec.seq_len == SEQ
    final = finalize(model, trained, (SEQ,), tmp_path / "final_model.onnx", TASK_CAUSAL_LM)
    fields = workload.finish(model, model_tensors(model), final, tmp_path)
    assert set(fields["per_source"]) == {"Elinor", "Emma", "Anne"}
    assert all(p["final"] < p["base"] for p in fields["per_source"].values())  # trained vs random init
    assert fields["final_perplexity"] < fields["base_perplexity"]
    assert min(p["final"] for p in fields["per_source"].values()) <= fields["final_perplexity"]
    assert fields["final_perplexity"] <= max(p["final"] for p in fields["per_source"].values())
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert samples == fields["samples"] and len(samples) == 3
    assert all(s["final"].startswith(s["prompt"]) and len(s["final"]) >= len(s["prompt"]) + 1 for s in samples)
    summary = {"model": "gpt", "dataset": "austen", "algorithm": "snake", "partition": "by-source", "num_agents": 2,
               "bytes_total": 1e6, "wall_s": 1.0, "round_test": [{"round": 0, "test_loss": 1.0}], **fields}  # fmt: skip
    report = lm_report.write_run_report(summary, tmp_path).read_text()
    assert "Elinor" in report and samples[0]["prompt"] in report
    assert lm_report.curve(summary) == [(0, fields["base_perplexity"]), (1, pytest.approx(math.e))]
    assert (tmp_path / lm_report.PLOT).stat().st_size > 0
