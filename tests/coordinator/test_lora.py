"""LoRA: adapters on the GPT's (and OPT's) projections, segments that train only adapters with ORT while
every other tensor stays bit-identical, hand-offs that carry only adapters once the receiver holds the
frozen tensors, and a merged inference ONNX that computes what the adapted model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from coordinator.build.artifacts import build_segment_artifacts  # noqa: E402
from coordinator.config import load_trial  # noqa: E402
from coordinator.errors import ConfigError  # noqa: E402
from coordinator.evaluate import finalize  # noqa: E402
from coordinator.export import TASK_CAUSAL_LM, ForwardModel, export_forward, export_inference, load_tensors  # noqa: E402
from coordinator.lora import lora_groups  # noqa: E402
from coordinator.plan import FROZEN_GROUP, GroupInfo  # noqa: E402
from coordinator.prepare import group_infos  # noqa: E402
from coordinator.scheduler import HopSettings, hop_tasks, snake_plan  # noqa: E402
from edge_agent.handover import hand_on, load_model  # noqa: E402
from edge_agent.ort_trainer import OrtTrainer  # noqa: E402
from edge_agent.protocol.delta import decode_model, digests_of  # noqa: E402
from edge_agent.trainer import TrainerError, TrainSpec  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402
from models.lora import GPT_TARGETS, OPT_TARGETS, adapter_names, apply_lora, has_lora, merge_lora  # noqa: E402
from tools.fakes import MemoryModelCache  # noqa: E402

TINY = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16)
RANK, ALPHA = 4, 8.0


def lora_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(TINY)
    apply_lora(model, RANK, ALPHA, GPT_TARGETS)
    return model


def _batch(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences counting up mod vocab: tokens and next-token labels."""
    start = np.random.default_rng(seed).integers(0, TINY.vocab_size, size=(rows, 1))
    seq = (start + np.arange(TINY.block_size + 1)) % TINY.vocab_size
    return seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)


@pytest.mark.torch
def test_adapters_wrap_the_targets_under_stable_names_and_are_all_that_trains() -> None:
    torch.manual_seed(0)
    plain = GPT(TINY)
    names = apply_lora(copy.deepcopy(plain), RANK, ALPHA, ["attn.qkv", "mlp.fc"])
    assert names == [f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "mlp.fc") for ab in "AB"]
    model = lora_gpt()
    params = dict(model.named_parameters())
    assert [n for n, p in params.items() if p.requires_grad] == adapter_names(model)
    assert {n for n in params if "lora" not in n} == {n for n, _ in plain.named_parameters()}  # base names kept
    assert params["blocks.0.attn.qkv.lora_A"].shape == (RANK, 16) and params["blocks.0.attn.qkv.lora_B"].shape == (
        48,
        RANK,
    )
    x = torch.from_numpy(_batch(2)[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # B = 0: a fresh adapter changes nothing
    with pytest.raises(ValueError, match=r"match no nn.Linear.*attn.qkv"):
        apply_lora(GPT(TINY), RANK, ALPHA, ["q_proj"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(GPT(TINY), 0, ALPHA, GPT_TARGETS)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, RANK, ALPHA, GPT_TARGETS)


@pytest.mark.torch
def test_merging_folds_adapters_into_plain_linears() -> None:
    model = lora_gpt()
    with torch.no_grad():
        for name in adapter_names(model):
            model.get_parameter(name).normal_(0, 0.1)
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 2 * len(GPT_TARGETS) and not has_lora(merged)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in GPT(TINY).named_parameters()]
    x = torch.from_numpy(_batch(3)[0])
    with torch.no_grad():
        assert not torch.allclose(model(x), GPT(TINY)(x))
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.torch
def test_opt_projections_take_adapters() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    base = {n for n, _ in model.named_parameters()}
    names = apply_lora(model, 2, 4.0, OPT_TARGETS)
    assert len(names) == 2 * 2 * len(OPT_TARGETS) and "model.decoder.layers.1.fc2.lora_B" in names
    assert {n for n, _ in model.named_parameters()} - set(names) == base
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).normal_(0, 0.1)
        ids = torch.randint(0, 50, (2, 7))
        adapted = model(ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)


def test_trial_settings_parse_and_check(tmp_path: Path) -> None:
    config = load_trial(
        None,
        {"model": "gpt", "dataset": "austen", "lora.rank": 8, "lora.alpha": 32.0, "lora.targets": "attn.qkv, mlp.fc"},
    )
    assert config.lora.enabled and config.lora.target_list == ("attn.qkv", "mlp.fc")
    assert not load_trial(None).lora.enabled
    path = tmp_path / "t.toml"
    path.write_text('[trial]\nmodel = "gpt"\ndataset = "austen"\n[lora]\nrank = 4\nalpha = 8\n')
    assert load_trial(path).lora.as_dict() == {"rank": 4, "alpha": 8.0, "targets": []}
    for overrides, message in (
        ({"lora.rank": -1}, "lora.rank"),
        ({"lora.rank": 4, "lora.alpha": 0.0}, "lora.alpha"),
        ({"lora.rank": 4, "lora.targets": "attn.qkv;rm -rf"}, "lora.targets"),
        ({"lora.rank": 4, "algorithm": "split"}, "split learning"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_trial(None, overrides)


@pytest.fixture(scope="module")
def forward(tmp_path_factory: pytest.TempPathFactory) -> ForwardModel:
    return export_forward(
        lora_gpt(), (TINY.block_size,), TINY.vocab_size, tmp_path_factory.mktemp("lora"), TASK_CAUSAL_LM
    )


@pytest.fixture(scope="module")
def groups(forward: ForwardModel) -> tuple[GroupInfo, ...]:
    return lora_groups(group_infos(forward, lora_gpt()), {n: t.size for n, t in forward.tensors.items()})


@pytest.mark.torch
def test_planner_sees_blocks_with_adapters_and_folds_the_rest(
    forward: ForwardModel, groups: tuple[GroupInfo, ...]
) -> None:
    plain = group_infos(forward, lora_gpt())
    assert [g.name for g in groups] == ["blocks.0", "blocks.1"]
    assert all(all("lora" in p for p in g.params) and not any("lora" in f for f in g.frozen) for g in groups)
    assert groups[0].frozen[0] == "embed.tok.weight" and groups[-1].frozen[-1] == "head.ln_f.bias"
    assert sum(g.num_params for g in groups) == sum(forward.tensors[n].size for g in groups for n in g.params)
    for field in ("flops", "act_bytes"):  # costs of embed and head are folded, not lost
        assert sum(getattr(g, field) for g in groups) == sum(getattr(g, field) for g in plain)
    held = sum(g.num_params + g.num_buffer_elems for g in groups)
    assert held == sum(t.size for t in forward.tensors.values())


@pytest.fixture(scope="module")
def trained(
    forward: ForwardModel, groups: tuple[GroupInfo, ...], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    """ORT trains the adapters of blocks.1 only; returns every tensor after training."""
    trainable = groups[1].params
    built = build_segment_artifacts(forward, trainable, tmp_path_factory.mktemp("cache"))
    assert set(built.trainable) == set(trainable) and all(onnx.load(built.directory / f).ir_version <= 10
                                                           for f in ("training_model.onnx", "eval_model.onnx"))  # fmt: skip
    trainer = OrtTrainer(threads=1)
    trainer.open(built.directory)
    trainer.set_weights(forward.tensors)
    x, y = _batch(16)
    before = trainer.evaluate(x, y).loss
    trainer.train(x, y, TrainSpec(epochs=40, batch_size=8, lr=3e-2))
    assert trainer.evaluate(x, y).loss < 0.97 * before  # one tiny block's adapters: a small but real drop
    return trainer.get_weights()


@pytest.mark.ort
@pytest.mark.torch
def test_a_lora_segment_trains_its_adapters_and_nothing_else(
    forward: ForwardModel, groups: tuple[GroupInfo, ...], trained: dict[str, np.ndarray]
) -> None:
    for name, start in forward.tensors.items():
        moved = not np.array_equal(trained[name], start)
        assert moved == (name in groups[1].params), name  # base weights bit-identical, every adapter moved
    assert all(np.any(trained[n] != 0) for n in groups[1].params if n.endswith("lora_B"))


@pytest.mark.ort
@pytest.mark.torch
def test_merged_inference_onnx_matches_the_adapted_model(trained: dict[str, np.ndarray], tmp_path: Path) -> None:
    model = lora_gpt()
    path = finalize(model, trained, (TINY.block_size,), tmp_path / "final.onnx", TASK_CAUSAL_LM)
    proto = onnx.load(path)
    assert not any("lora" in init.name for init in proto.graph.initializer)
    plain = onnx.load(export_inference(GPT(TINY), (TINY.block_size,), tmp_path / "plain.onnx", task=TASK_CAUSAL_LM))
    assert [str(i.type) for i in proto.graph.input] == [str(i.type) for i in plain.graph.input]
    assert [str(o.type) for o in proto.graph.output] == [str(o.type) for o in plain.graph.output]
    adapted = copy.deepcopy(model)
    load_tensors(adapted, trained)
    x = _batch(5, seed=3)[0]
    with torch.no_grad():
        expected = adapted.eval()(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    assert np.abs(logits - expected).max() < 1e-5
    assert has_lora(model)  # the trial's model keeps its adapters


@pytest.mark.ort
@pytest.mark.torch
def test_after_an_agents_first_model_only_adapters_travel(
    forward: ForwardModel, groups: tuple[GroupInfo, ...], trained: dict[str, np.ndarray]
) -> None:
    plan = snake_plan(["a", "b"], groups, 2)
    layout = plan.groups()
    assert list(layout) == ["blocks.0", "blocks.1", FROZEN_GROUP]
    arts = {(s.index, "ort"): ("0" * 64, 1) for s in plan.segments}
    tasks = [t for ts in hop_tasks(plan, arts, HopSettings(1, 8, 0.1, 0, None)).values() for t in ts]
    task = next(t for t in tasks if t.groups == ["blocks.1"] and t.next_holds)  # b holds a's earlier output
    first = next(t for t in sorted(tasks, key=lambda t: t.hop) if not t.next_holds)  # a receiver holding nothing
    cache = MemoryModelCache()
    versions, digests = dict(plan.versions_after(task.hop - 1)), digests_of(forward.tensors, layout)
    out = hand_on(task, trained, versions, digests, layout, "none", cache, "t")
    payload, header = decode_model(out.data)
    assert header is not None and FROZEN_GROUP not in header.sent
    assert set(payload) <= {n for g in groups for n in g.params}  # adapters only
    adapter_bytes = sum(forward.tensors[n].nbytes for n in payload)
    model_bytes = sum(t.nbytes for t in forward.tensors.values())
    assert len(out.data) < adapter_bytes + 4096 and len(out.data) < model_bytes / 3
    receiver = MemoryModelCache()  # b's copy: the frozen tensors and the groups at the versions it holds
    receiver.save("t", 0, task.next_holds, forward.tensors, "")
    whole = load_model(out.data, task, layout, receiver, "t").tensors
    assert all(np.array_equal(whole[n], trained[n]) for n in forward.order)  # completed bit-identically
    fresh = hand_on(first, forward.tensors, plan.versions_after(first.hop - 1), digests, layout, "none", cache, "t")
    assert len(fresh.data) > model_bytes  # a receiver that holds nothing gets everything, once
    leaky = {**trained, "blocks.0.attn.qkv.weight": trained["blocks.0.attn.qkv.weight"] + 1}
    with pytest.raises(TrainerError, match=f"frozen layer group '{FROZEN_GROUP}'"):
        hand_on(task, leaky, versions, digests, layout, "none", cache, "t")
