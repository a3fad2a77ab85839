"""OPT-architecture models from a local Hugging Face directory: loading, layer groups, export, ORT artifacts,
and the ONNX external-data path (forced on a small model by lowering the threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from coordinator.build.artifacts import build_segment_artifacts  # noqa: E402
from coordinator.build.bundle import pack_dir  # noqa: E402
from coordinator.export import TASK_CAUSAL_LM, ForwardModel, export_forward  # noqa: E402
from coordinator.onnx_external import DEFAULT_THRESHOLD, THRESHOLD_ENV, external_threshold  # noqa: E402
from edge_agent.bundle import ArtifactStore  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.protocol.transfer import sha256_hex  # noqa: E402
from edge_agent.trainer import TrainSpec  # noqa: E402
from models import InputSpec, build_model, layer_groups  # noqa: E402
from models.opt import OPT, load_opt, opt_config  # noqa: E402

pytestmark = [pytest.mark.ort, pytest.mark.torch]

VOCAB, SEQ, LAYERS = 50, 12, 3
TINY = {
    "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": LAYERS, "ffn_dim": 32, "num_attention_heads": 2,
    "max_position_embeddings": 16, "word_embed_proj_dim": 16, "dropout": 0.0, "pad_token_id": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny OPT written as Hugging Face writes a checkpoint (config.json + model.safetensors)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("opt-tiny")
    transformers.OPTForCausalLM(opt_config(**TINY)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def forward(opt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ForwardModel:
    return export_forward(load_opt(opt_dir), (SEQ,), VOCAB, tmp_path_factory.mktemp("fw"), TASK_CAUSAL_LM)


def _batch(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    start = np.random.default_rng(seed).integers(0, VOCAB, size=(rows, 1))
    seq = (start + np.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)


def test_loads_offline_matches_hugging_face_and_groups(opt_dir: Path) -> None:
    assert {"config.json", "model.safetensors"} <= {p.name for p in opt_dir.iterdir()}
    model = build_model(f"opt:{opt_dir}", InputSpec(num_classes=VOCAB, seq_len=SEQ))
    assert isinstance(model, OPT)
    assert layer_groups(model) == ["embed", *(f"decoder.layers.{i}" for i in range(LAYERS)), "head"]
    names = list(model.state_dict())
    assert names == [name for name, _ in model.named_parameters()]  # tied head: one tensor, one name
    assert "embed.tokens.weight" in names and "embed.positions.weight" in names
    assert not any("lm_head" in n for n in names)
    reference = transformers.OPTForCausalLM.from_pretrained(opt_dir, local_files_only=True).eval()
    x, _ = _batch(2)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(x)).logits
        torch.testing.assert_close(model.eval()(torch.from_numpy(x)), expected, rtol=1e-5, atol=1e-5)


def test_bad_directories_are_clear_errors(opt_dir: Path, tmp_path: Path) -> None:
    spec = InputSpec(num_classes=VOCAB, seq_len=SEQ)
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model(f"opt:{tmp_path}", spec)
    (tmp_path / "config.json").write_text((opt_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        build_model(f"opt:{tmp_path}", spec)
    with pytest.raises(ValueError, match="does not fit"):
        build_model(f"opt:{opt_dir}", InputSpec(num_classes=VOCAB, seq_len=64))
    other = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an OPT model"):
        build_model(f"opt:{other}", spec)


def test_export_keeps_names_and_ir(forward: ForwardModel, opt_dir: Path) -> None:
    proto = onnx.load(forward.onnx_path)
    assert proto.ir_version <= 10
    assert set(forward.order) == {name for name, _ in load_opt(opt_dir).named_parameters()}
    assert forward.group("embed").params == ("embed.tokens.weight", "embed.positions.weight")
    assert forward.group("head").params == ("head.final_layer_norm.weight", "head.final_layer_norm.bias")
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [i.name for i in proto.graph.input] == ["input"]  # mask and positions are built inside
    layernorms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(layernorms) == 2 * LAYERS + 1 and all(len(n.output) == 3 for n in layernorms)
    assert not (forward.onnx_path.parent / "forward.onnx.data").exists()  # small: tensors inline


def _train(
    directory: Path, tensors: dict[str, np.ndarray], epochs: int, lr: float = 3e-2
) -> tuple[float, float, dict[str, np.ndarray]]:
    trainer = OrtTrainer(threads=1)
    trainer.open(directory)
    trainer.set_weights(tensors)
    x, y = _batch(16)
    before = trainer.evaluate(x, y).loss
    trainer.train(x, y, TrainSpec(epochs=epochs, batch_size=8, lr=lr))
    return before, trainer.evaluate(x, y).loss, trainer.get_weights()


def test_slice_of_blocks_trains_and_loss_decreases(forward: ForwardModel, tmp_path: Path) -> None:
    trainable = forward.params_of(["decoder.layers.1", "decoder.layers.2"])
    built = build_segment_artifacts(forward, trainable, tmp_path / "cache")
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(built.directory / name).ir_version <= 10
    before, after, weights = _train(built.directory, forward.tensors, epochs=25)
    assert before == pytest.approx(np.log(VOCAB), rel=0.15) and after < 0.97 * before
    for name in forward.order:
        assert (not np.array_equal(weights[name], forward.tensors[name])) == (name in trainable), name


def test_default_threshold_is_protobufs_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    assert external_threshold() == DEFAULT_THRESHOLD and 2_000_000_000 < DEFAULT_THRESHOLD < 2**31
    monkeypatch.setenv(THRESHOLD_ENV, "1000")
    assert external_threshold() == 1000
    monkeypatch.setenv(THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match=THRESHOLD_ENV):
        external_threshold()


def test_forced_external_data_end_to_end(
    forward: ForwardModel, opt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the (lowered) threshold: one data file, memory-mapped tensors, the same self-contained bundles."""
    monkeypatch.setenv(THRESHOLD_ENV, "1024")
    big = export_forward(load_opt(opt_dir), (SEQ,), VOCAB, tmp_path / "fw", TASK_CAUSAL_LM)
    assert sorted(p.name for p in big.onnx_path.parent.iterdir()) == ["forward.onnx", "forward.onnx.data"]
    proto = onnx.load(big.onnx_path, load_external_data=False)
    external = {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert external == set(big.order) and big.order == forward.order
    assert all(isinstance(big.tensors[n], np.memmap) for n in big.order)
    for name in forward.order:
        np.testing.assert_array_equal(big.tensors[name], forward.tensors[name])
    loaded = onnx.load(big.onnx_path)  # onnx resolves the data file itself
    assert {i.name for i in loaded.graph.initializer} >= set(big.order)
    trainable = big.params_of(["decoder.layers.2", "head"])
    built = build_segment_artifacts(big, trainable, tmp_path / "cache")
    inline = build_segment_artifacts(forward, trainable, tmp_path / "cache-inline")
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "nominal_checkpoint"):
        graph = built.directory / name
        assert graph.read_bytes() == (inline.directory / name).read_bytes(), name  # weights never in a bundle
    assert not (built.directory / "checkpoint").exists()
    store = ArtifactStore(tmp_path / "agent")
    unpacked = store.put(sha256_hex(pack_dir(built.directory)), pack_dir(built.directory))
    result = _train(unpacked, big.tensors, epochs=3)
    reference = _train(inline.directory, forward.tensors, epochs=3)
    assert result[:2] == reference[:2]
    assert json.loads((unpacked / "manifest.json").read_text())["task"] == "causal-lm"
