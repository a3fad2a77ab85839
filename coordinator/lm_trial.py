"""Language-model trials: the corpus split between pretraining and fine-tuning, the base model, the
evaluation per source (novel) and sampled continuations before and after.

The split: each novel's token stream is cut 80/10/10 into train / validation / test parts
(:mod:`coordinator.text.sequences`). The base model is pretrained on the first ``lm.pretrain_fraction``
of every novel's train part; the agents fine-tune on the rest of it (partitioned as the trial says:
``by-source`` gives each agent whole novels) and validate on the validation parts; the test parts
are held out from both and give ``base_perplexity``, ``final_perplexity`` and ``per_source``.

A checkpoint (``opt:PATH``, :mod:`coordinator.lm_checkpoint`) is its own base: nothing is pretrained, the
agents fine-tune on the whole train parts, and the corpus is tokenized for the checkpoint's vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import TrialConfig
from coordinator.errors import ConfigError
from coordinator.evaluate import TestResult, evaluate_lm_onnx, finalize
from coordinator.export import TASK_CAUSAL_LM
from coordinator.pretrain import PretrainSettings, cache_root, cached_base, load_state
from coordinator.text.tokenizer import ByteTokenizer, Tokenizer
from edge_agent.textdata import TokenDataset, lm_pairs
from models import InputSpec

log = logging.getLogger(__name__)
PROMPTS = ("It is a truth universally acknowledged", '"My dear,"', "She could not help")
SAMPLE_TEMPERATURE = 0.7  # seeded sampling: the same seed before and after, so only the model differs


@dataclass(frozen=True)
class TextSplit:
    pretrain: np.ndarray  # sequences [N, T + 1] the base model is pretrained on
    finetune: TokenDataset  # the rest of every train part; validation and test parts as in the corpus


def load_text(config: TrialConfig, tokenizer: Tokenizer | None = None) -> TokenDataset:
    """The trial's token data set (``austen`` or ``austen:DIR``); byte tokens unless ``tokenizer`` is given."""
    from coordinator.text.sequences import austen_tokens

    kind, _, arg = config.dataset.partition(":")
    if kind != "austen":
        raise ConfigError(f"unknown text dataset {config.dataset!r}; use austen or austen:DIR")
    return austen_tokens(config.lm.seq_len, Path(arg) if arg else None, tokenizer)


def split_corpus(ds: TokenDataset, fraction: float) -> TextSplit:
    """Per source, the first ``fraction`` of its training sequences (in text order) for pretraining."""
    pre, rest = [], []
    for source in range(ds.num_sources):
        idx = np.flatnonzero(ds.y_train == source)
        cut = int(round(len(idx) * fraction))
        pre.append(idx[:cut])
        rest.append(idx[cut:])
    keep = np.concatenate(rest)
    finetune = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
    return TextSplit(ds.x_train[np.concatenate(pre)], finetune)


def pretrain_progress(step: int, steps: int, loss: float) -> None:
    if step == steps or step % max(1, steps // 10) == 0:
        log.info("pretraining the base model: step %d/%d, loss %.3f", step, steps, loss)


def base_tensors(config: TrialConfig, split: TextSplit, ds: TokenDataset) -> tuple[dict[str, np.ndarray] | None, str]:
    """The fine-tuning's starting point (None: random init) and where it came from."""
    lm = config.lm
    if lm.base_model == "none":
        return None, "none"
    if lm.base_model != "auto":
        return load_state(Path(lm.base_model)), lm.base_model
    settings = PretrainSettings(config.model, ds.vocab_size, ds.seq_len, lm.pretrain_steps, lm.pretrain_batch_size,
                                lm.pretrain_lr, config.seed)  # fmt: skip
    tensors, path, _ = cached_base(settings, split.pretrain, ds.pad_id, cache_root(lm.cache_dir), pretrain_progress)
    return tensors, str(path)


def spread(count: int, cap: int) -> np.ndarray:
    """``cap`` indices spread evenly over ``count`` (all of them when ``cap`` is 0 or large enough)."""
    if cap == 0 or cap >= count:
        return np.arange(count)
    return np.linspace(0, count - 1, cap).astype(np.int64)


class LmWorkload:
    """What a trial of a language model evaluates: the held-out test part of every source."""

    task = TASK_CAUSAL_LM

    def __init__(self, config: TrialConfig, ds: TokenDataset, initial: Mapping[str, np.ndarray] | None,
                 base_source: str, tokenizer: Tokenizer | None = None, tokenizer_name: str = "byte-level") -> None:  # fmt: skip
        self.config, self.initial, self.base_source = config, initial, base_source
        self.tokenizer: Tokenizer = tokenizer or ByteTokenizer()
        self.tokenizer_name = tokenizer_name
        self.spec = InputSpec(num_classes=ds.vocab_size, seq_len=ds.seq_len)
        self.pad_id, self.seq_len = ds.pad_id, ds.seq_len
        self.tests: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for source, name in enumerate(ds.sources):
            seqs = ds.x_test[ds.y_test == source]
            if len(seqs):
                self.tests[name] = lm_pairs(seqs[spread(len(seqs), config.lm.test_per_source)], ds.pad_id)
        if not self.tests:
            raise ConfigError(f"{ds.name} has no test sequences to evaluate on")
        self.x = np.concatenate([x for x, _ in self.tests.values()])
        self.y = np.concatenate([y for _, y in self.tests.values()])

    def evaluate(self, onnx_path: Path) -> TestResult:
        return evaluate_lm_onnx(onnx_path, self.x, self.y)

    def per_source(self, onnx_path: Path) -> tuple[dict[str, float], float]:
        """(source -> test perplexity, overall test perplexity: token-weighted over the sources)."""
        out, loss_sum, counted = {}, 0.0, 0
        for name, (x, y) in self.tests.items():
            result = evaluate_lm_onnx(onnx_path, x, y)
            tokens = int((y >= 0).sum())
            out[name] = round(result.perplexity, 4)
            loss_sum, counted = loss_sum + result.loss * tokens, counted + tokens
        return out, round(math.exp(loss_sum / max(counted, 1)), 4)

    def finish(self, model: Any, initial: Mapping[str, np.ndarray], final_onnx: Path, out: Path) -> dict[str, Any]:
        """The summary's language-model fields; writes ``base_model.onnx`` and ``samples.json`` / ``.md``."""
        base_onnx = finalize(model, initial, (self.seq_len,), out / "base_model.onnx", TASK_CAUSAL_LM)
        base, base_all = self.per_source(base_onnx)
        final, final_all = self.per_source(final_onnx)
        samples = write_samples(base_onnx, final_onnx, out, self.config.lm.sample_tokens, self.seq_len, self.tokenizer)
        return {
            "base_model": self.base_source,
            "tokenizer": self.tokenizer_name,
            "base_perplexity": base_all,
            "final_perplexity": final_all,
            "per_source": {name: {"base": base[name], "final": final[name]} for name in self.tests},
            "test_sequences_per_source": {name: len(x) for name, (x, _) in self.tests.items()},
            "seq_len": self.seq_len,
            "samples": samples,
        }


def continue_text(onnx_path: Path, prompt: str, tokens: int, seq_len: int, tok: Tokenizer, seed: int = 0) -> str:
    """``prompt`` and ``tokens`` tokens sampled after it (temperature SAMPLE_TEMPERATURE, seeded) by an
    inference ONNX of a causal LM (plain onnxruntime; the last ``seq_len`` tokens are the context),
    encoded and decoded with ``tok``, the tokenizer the model was trained with."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in tok.encode(prompt)]
    for _ in range(tokens):
        window = ids[-seq_len:]
        x = np.full((1, seq_len), tok.pad, np.int64)
        x[0, : len(window)] = window  # causal: the padding after the context changes nothing before it
        logits = session.run(None, {name: x})[0][0, len(window) - 1].astype(np.float64) / SAMPLE_TEMPERATURE
        probs = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return tok.decode(np.array(ids))


def write_samples(
    base: Path, final: Path, out: Path, tokens: int, seq_len: int, tok: Tokenizer
) -> list[dict[str, str]]:
    """The same prompts continued by the base and the final model: ``samples.json`` and ``samples.md``."""
    samples = [
        {
            "prompt": p,
            "base": continue_text(base, p, tokens, seq_len, tok),
            "final": continue_text(final, p, tokens, seq_len, tok),
        }  # fmt: skip
        for p in (PROMPTS if tokens else ())
    ]
    (out / "samples.json").write_text(json.dumps(samples, indent=1) + "\n")
    (out / "samples.md").write_text(samples_markdown(samples))
    return samples


def samples_markdown(samples: list[dict[str, str]]) -> str:
    lines = ["# Sampled continuations (same prompt and seed; base model, then after fine-tuning)", ""]
    for s in samples:
        lines += [f"## {s['prompt']!r}", "", "base:", "", "    " + s["base"].replace("\n", "\n    "), "",
                  "final:", "", "    " + s["final"].replace("\n", "\n    "), ""]  # fmt: skip
    return "\n".join(lines)


def text_workload(config: TrialConfig) -> tuple[LmWorkload, TokenDataset]:
    """The workload of a text trial and the token data set its agents fine-tune on (partition it)."""
    if config.is_checkpoint:
        return checkpoint_workload(config)
    ds = load_text(config)
    split = split_corpus(ds, config.lm.pretrain_fraction)
    initial, source = base_tensors(config, split, ds)
    log.info("fine-tuning %s from base %s on %d sequences (%d held back for pretraining)", config.model, source,
             len(split.finetune.x_train), len(split.pretrain))  # fmt: skip
    return LmWorkload(config, split.finetune, initial, source), split.finetune


def checkpoint_workload(config: TrialConfig) -> tuple[LmWorkload, TokenDataset]:
    """A checkpoint's trial (``opt:PATH``): its tokenizer, no pretraining, the whole train parts to fine-tune."""
    from coordinator.lm_checkpoint import checkpoint_dir, checkpoint_tokenizer, note_unused_pretraining

    directory = checkpoint_dir(config.model)
    assert directory is not None  # config.is_checkpoint
    note_unused_pretraining(config)
    tok, described = checkpoint_tokenizer(directory, config.lm)
    log.info("tokenizer of %s: %s", config.model, described)
    ds = load_text(config, tok)
    log.info("fine-tuning %s (the checkpoint is the base) on %d sequences of %d tokens", config.model,
             len(ds.x_train), ds.seq_len)  # fmt: skip
    return LmWorkload(config, ds, None, f"checkpoint {directory}", tok, described), ds
