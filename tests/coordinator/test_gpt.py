"""The GPT language model: layer groups, one tied tensor, export and per-segment ORT training artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from coordinator.build.artifacts import build_segment_artifacts  # noqa: E402
from coordinator.export import TASK_CAUSAL_LM, ForwardModel, export_forward  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.protocol.manifest import IGNORE_INDEX  # noqa: E402
from edge_agent.trainer import TrainSpec  # noqa: E402
from models import InputSpec, build_model, layer_groups  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

TINY = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def forward(tmp_path_factory: pytest.TempPathFactory) -> ForwardModel:
    torch.manual_seed(0)
    model = GPT(TINY)
    return export_forward(model, (TINY.block_size,), TINY.vocab_size, tmp_path_factory.mktemp("gpt"), TASK_CAUSAL_LM)


def _batch(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences counting up mod vocab (an easy pattern to learn): tokens and next-token labels."""
    start = np.random.default_rng(seed).integers(0, TINY.vocab_size, size=(rows, 1))
    seq = (start + np.arange(TINY.block_size + 1)) % TINY.vocab_size
    return seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)


def test_registry_builds_gpt_with_groups_and_one_tied_tensor() -> None:
    model = build_model("gpt", InputSpec(num_classes=259, seq_len=32))
    assert isinstance(model, GPT) and model.config.vocab_size == 259 and model.config.block_size == 32
    assert layer_groups(model) == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    names = list(model.state_dict())
    assert names == [name for name, _ in model.named_parameters()]  # no duplicate (tied) entry, no buffers
    assert "embed.tok.weight" in names and not any("head" in n and "weight" in n and "ln_f" not in n for n in names)
    with pytest.raises(ValueError, match="seq_len"):
        build_model("gpt", InputSpec())


def test_forward_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens, _ = _batch(2)
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(torch.from_numpy(tokens)), model(torch.from_numpy(changed))
    assert a.shape == (2, TINY.block_size, TINY.vocab_size)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # a later token never changes earlier logits
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_export_keeps_names_one_tied_tensor_and_ir(forward: ForwardModel) -> None:
    proto = onnx.load(forward.onnx_path)
    assert proto.ir_version <= 10
    torch.manual_seed(0)
    assert set(forward.order) == {name for name, _ in GPT(TINY).named_parameters()}
    assert [g.name for g in forward.groups] == ["embed", "blocks.0", "blocks.1", "head"]
    assert forward.group("head").params == ("head.ln_f.weight", "head.ln_f.bias")
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    layernorms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(layernorms) == 2 * TINY.n_layer + 1 and all(len(n.output) == 3 for n in layernorms)


@pytest.mark.parametrize("groups", [("embed",), ("blocks.1", "head")])
def test_segment_trains_and_loss_decreases(forward: ForwardModel, tmp_path: Path, groups: tuple[str, ...]) -> None:
    trainable = forward.params_of(groups)
    built = build_segment_artifacts(forward, trainable, tmp_path / "cache")
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(built.directory / name).ir_version <= 10
    trainer = OrtTrainer(threads=1)
    trainer.open(built.directory)
    assert trainer.manifest.task == "causal-lm" and trainer.manifest.input_shape == (TINY.block_size,)
    trainer.set_weights(forward.tensors)
    x, y = _batch(16)
    before = trainer.evaluate(x, y)
    assert before.loss == pytest.approx(np.log(TINY.vocab_size), rel=0.1)  # untrained: near uniform
    trainer.train(x, y, TrainSpec(epochs=30, batch_size=8, lr=1e-2))
    after = trainer.evaluate(x, y)
    assert after.loss < 0.9 * before.loss
    weights = trainer.get_weights()
    for name in forward.order:  # only the segment moved
        moved = not np.array_equal(weights[name], forward.tensors[name])
        assert moved == (name in trainable), name


def test_ignored_labels_count_for_nothing(forward: ForwardModel, tmp_path: Path) -> None:
    built = build_segment_artifacts(forward, forward.params_of(["head"]), tmp_path / "cache")
    trainer = OrtTrainer(threads=1)
    trainer.open(built.directory)
    trainer.set_weights(forward.tensors)
    x, y = _batch(4)
    masked = y.copy()
    masked[:, 6:] = IGNORE_INDEX  # "padding": only the first 6 positions have targets
    full, part = trainer.evaluate(x, y), trainer.evaluate(x, masked)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = GPT(TINY).eval()(torch.from_numpy(x))
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, TINY.vocab_size), torch.from_numpy(masked).reshape(-1), ignore_index=IGNORE_INDEX
        )
    assert part.loss == pytest.approx(float(expected), rel=1e-4)
    assert full.loss != pytest.approx(part.loss, rel=1e-6)
