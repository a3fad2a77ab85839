"""The coordinator's pieces of a language-model trial: prepare (export, layer-group costs, ORT bundles),
the final model's evaluation (perplexity), and the agents' token partitions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from coordinator.config import TrialConfig  # noqa: E402
from coordinator.evaluate import evaluate_lm_onnx, finalize, token_loss  # noqa: E402
from coordinator.export import TASK_CAUSAL_LM, model_tensors  # noqa: E402
from coordinator.partitions import write_token_partitions  # noqa: E402
from coordinator.prepare import prepare  # noqa: E402
from coordinator.text.sequences import build_token_dataset  # noqa: E402
from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.localdata import load_local  # noqa: E402
from edge_agent.protocol.manifest import IGNORE_INDEX  # noqa: E402
from models import InputSpec  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

SEQ = 16


def test_token_loss_skips_ignored_labels() -> None:
    logits = np.zeros((1, 3, 4))
    logits[0, 0, 2] = 10.0
    loss, counted, correct = token_loss(logits, np.array([[2, IGNORE_INDEX, 1]]))
    assert counted == 2 and correct == 1
    assert loss == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 3)) + math.log(4), rel=1e-9)


def test_token_loss_matches_a_float64_reference_on_float32_logits() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 7, 1000)) * 8).astype(np.float32)
    labels = rng.integers(0, 1000, (3, 7))
    labels[1, 2:] = IGNORE_INDEX
    flat = logits.reshape(-1, 1000).astype(np.float64)[labels.reshape(-1) != IGNORE_INDEX]
    kept = labels.reshape(-1)[labels.reshape(-1) != IGNORE_INDEX]
    log_probs = flat - flat.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    loss, counted, _ = token_loss(logits, labels)
    assert counted == len(kept) == 16
    assert loss == pytest.approx(float(-log_probs[np.arange(16), kept].sum()), rel=1e-6)


def test_evaluation_batches_keep_a_large_vocabularys_logits_bounded() -> None:
    from coordinator.evaluate import LOGITS_BYTES, lm_batch_size

    class Session:
        def __init__(self, vocab: object) -> None:
            self.vocab = vocab

        def get_outputs(self) -> list[object]:
            return [type("Out", (), {"shape": ["batch", "seq", self.vocab]})()]

    assert lm_batch_size(Session(259), 64) == 64  # the byte-level gpt: unchanged
    opt = lm_batch_size(Session(50272), 64)
    assert 1 <= opt < 64 and opt * 64 * 50272 * 4 <= LOGITS_BYTES
    assert lm_batch_size(Session(50272), 4096) == 1  # never zero
    assert lm_batch_size(Session("vocab"), 64) == 64  # a symbolic size: the cap


def test_prepare_exports_gpt_and_measures_its_groups(tmp_path: Path) -> None:
    config = TrialConfig(model="gpt", dataset="austen", partition="by-source")
    prepared = prepare(config, InputSpec(num_classes=259, seq_len=SEQ), tmp_path)
    assert prepared.forward.task == TASK_CAUSAL_LM and prepared.forward.input_shape == (SEQ,)
    names = [g.name for g in prepared.groups]
    assert names == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert all(g.act_bytes > 0 for g in prepared.groups)
    width, linear = 128, 2 * SEQ * 12 * 128 * 128  # per sample: qkv, proj, fc, proj = 12 C^2 MACs per token
    assert prepared.groups[1].flops == linear + 2 * 2 * SEQ * SEQ * width  # + attention's two products
    assert prepared.groups[-1].flops == 2 * SEQ * width * 259  # the tied head's projection runs in "head"
    tokens = torch.randint(0, 259, (3, SEQ + 1)).numpy()
    x, y = tokens[:, :-1], tokens[:, 1:].copy()
    y[:, -4:] = IGNORE_INDEX
    onnx_path = finalize(prepared.model, model_tensors(prepared.model), (SEQ,), tmp_path / "final.onnx", TASK_CAUSAL_LM)
    result = evaluate_lm_onnx(onnx_path, x, y, batch_size=2)
    with torch.no_grad():
        logits = prepared.model.eval()(torch.from_numpy(x))
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 259), torch.from_numpy(y).reshape(-1))
    assert result.loss == pytest.approx(float(expected), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(float(expected)), rel=1e-3)
    assert 200 < result.perplexity < 330  # untrained: about uniform over 259 tokens


def test_token_partitions_by_source_for_agents(tmp_path: Path) -> None:
    texts = {name: (name + " went for a walk. ") * 40 for name in ("Elinor", "Elizabeth", "Fanny")}
    ds = build_token_dataset("toy", texts, seq_len=SEQ)
    config = TrialConfig(model="gpt", partition="by-source", agents=2, seed=3)
    paths = write_token_partitions(config, ds, tmp_path / "data")
    histograms = [load_local(AgentConfig(f"a{i}", "mqtt://x", f"npz:{p}")).histogram() for i, p in enumerate(paths)]
    train_counts = np.bincount(ds.y_train, minlength=3)
    assert histograms == [[train_counts[0], 0, train_counts[2]], [0, train_counts[1], 0]]
    agent = load_local(AgentConfig("a1", "mqtt://x", f"npz:{paths[1]}"))
    assert agent.input_shape == [SEQ] and agent.num_classes == 259 and len(agent.y_val) > 0
