#!/usr/bin/env python3
"""Benchmark: peak memory of one Snake Learning hop on a language model against full fine-tuning.

The parent (coordinator venv, torch) builds the model with random weights (no download: OPT-1.3B's
architecture from a config written to a local directory, or the trials' GPT), exports it (tensors over
2 GB go to ONNX external data) and builds the ORT training artifacts of each case. Then, one at a time,
a fresh child process (no torch; onnxruntime-training's on-device API, AdamW, fp32, the agent's
``OrtTrainer``) loads all weights, trains a few steps at the given batch and sequence length and reports:

- ``load_peak_mb``: VmHWM while the weights are loaded (ORT's copy, filled one tensor at a time, each read
  from the exported model's external data file when it is needed: an agent loading from its disk cache);
- ``train_peak_mb``: VmHWM over the training steps, after resetting it (``/proc/self/clear_refs``);
- ``handoff_peak_mb``: VmHWM while the trained weights come out of ONNX Runtime for the hand-off
  (``release_weights``: ORT's own tensors, no copy, while the training state goes), after resetting it;
- ``peak_mb``: the largest of the three: the hop's peak.

Cases: ``snake-hop`` trains a slice of consecutive blocks (the first ones: gradients then flow back
through every later block, the worst place for a slice); ``full`` trains every parameter. The parent
watches each child's RSS and kills it above ``--cap-gb`` (the machine is shared), recording the phase
and RSS where it stopped; the JSON then carries the estimate instead (parameters x 16 bytes: weight,
gradient, AdamW's two moments, plus the measured activation part of the hop).

    python tools/bench_llm_memory.py --model opt-1.3b --out runs/llm-memory-opt.json [--batch 1 --seq 128]
    python tools/bench_llm_memory.py --model gpt --out runs/llm-memory-gpt.json [--seq 64 --batch 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

OPT_1_3B = {  # facebook/opt-1.3b's config.json, architecture fields (weights: random, never downloaded)
    "vocab_size": 50272, "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048,
    "do_layer_norm_before": True, "activation_function": "relu", "dropout": 0.1, "attention_dropout": 0.0,
    "enable_bias": True, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
}  # fmt: skip
MB = 1 << 20


# -- child: one measurement -------------------------------------------------------------------------
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class _Lazy(Mapping[str, Any]):
    """The forward model's tensors, each read from the external data file only when asked for and not
    kept: an agent loading its frozen weights from its disk cache. (Memory maps kept for every tensor
    would leave the whole file resident once read.)"""

    def __init__(self, proto: Any, path: Path, names: list[str]) -> None:
        from coordinator.onnx_external import tensor_views  # onnx + numpy only

        self._read = lambda name: tensor_views(proto, path, [name])[name]
        self._names = set(names)
        self._order = names

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._names)


def _forward_tensors(forward_onnx: Path, names: list[str]) -> Mapping[str, Any]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(forward_onnx, load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return _Lazy(proto, forward_onnx, names)
    by_name = {i.name: i for i in proto.graph.initializer}
    return {name: numpy_helper.to_array(by_name[name]) for name in names}


def child(args: argparse.Namespace) -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_agent.ort_trainer import OrtTrainer
    from edge_agent.trainer import TrainSpec

    _say(phase="start", rss=_status("VmRSS"))
    trainer = OrtTrainer(threads=args.threads)
    trainer.open(Path(args.child))
    tensors = _forward_tensors(Path(args.forward), list(trainer.manifest.order))
    _say(phase="loading", rss=_status("VmRSS"))
    t0 = time.perf_counter()
    trainer.set_weights(tensors)
    del tensors
    load_peak, loaded = _status("VmHWM"), _status("VmRSS")
    _say(phase="loaded", rss=loaded, hwm=load_peak, seconds=time.perf_counter() - t0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the training phase's own peak from here
    rng = np.random.default_rng(0)
    vocab = trainer.manifest.num_classes
    x = rng.integers(0, vocab, size=(args.batch, args.seq)).astype(np.int64)
    y = np.roll(x, -1, axis=1)
    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        stats = trainer.train(x, y, TrainSpec(epochs=1, batch_size=args.batch, lr=1e-4, seed=step))
        times.append(time.perf_counter() - t0)
        losses.append(stats.loss)
        _say(phase=f"step {step + 1}", rss=_status("VmRSS"), hwm=_status("VmHWM"), seconds=times[-1])
    train_peak = _status("VmHWM")
    # the hand-off: the trained weights out of ONNX Runtime (the session goes), the trained tensors taken
    # to be sent on, as the agent's hop does before it encodes them
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    weights = trainer.release_weights()
    sent = {name: weights[name] for name in trainer.manifest.trainable}
    handoff_bytes = sum(int(t.nbytes) for t in sent.values())
    handoff_peak, handoff_seconds = _status("VmHWM"), time.perf_counter() - t0
    _say(phase="handed off", rss=_status("VmRSS"), hwm=handoff_peak, seconds=handoff_seconds)
    _say(
        phase="done", load_peak=load_peak, loaded_rss=loaded, train_peak=train_peak, handoff_peak=handoff_peak,
        handoff_bytes=handoff_bytes, losses=losses, step_seconds=times,
    )  # fmt: skip


# -- parent -----------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, work: Path) -> tuple[Any, int, list[str], str]:
    """(model, vocab, block groups, description)."""
    if args.model == "opt-1.3b":
        from models.opt import load_opt_config, opt_config, random_opt

        config_dir = work / "opt-1.3b-config"
        opt_config(**OPT_1_3B).save_pretrained(config_dir)  # config.json only: a local HF-format directory
        model = random_opt(load_opt_config(config_dir))
        blocks = [g for g in model.group_names() if g.startswith("decoder.layers.")]
        return model, OPT_1_3B["vocab_size"], blocks, f"OPT-1.3B architecture from {config_dir}/config.json"
    from models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=259, block_size=args.seq)  # the trials' GPT (models/gpt.py defaults)
    model = GPT(config)
    blocks = [g for g in model.group_names() if g.startswith("blocks.")]
    return model, config.vocab_size, blocks, f"models.gpt GPT {config}"


def prepare_cases(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from coordinator.build.artifacts import build_segment_artifacts
    from coordinator.export import TASK_CAUSAL_LM, export_forward

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, vocab, blocks, what = build_model(args, work)
    hop_groups = blocks[: args.slice]
    lora: list[str] = []
    if args.lora_rank:  # adapters only on the slice's attention and MLP projections (models/lora.py)
        from models.lora import apply_lora

        targets = [f"{g.split('.', 1)[1]}.{p}" for g in hop_groups for p in args.lora_targets.split(",")]
        lora = apply_lora(model, args.lora_rank, 2.0 * args.lora_rank, targets)
    params = sum(p.numel() for p in model.parameters())
    forward = export_forward(model, (args.seq,), vocab, work / "forward", task=TASK_CAUSAL_LM)
    del model
    gc.collect()
    export_seconds = time.perf_counter() - t0
    cases = {"snake-hop": forward.params_of(hop_groups), "full": forward.order}
    if lora:
        cases["snake-hop-lora"] = tuple(n for n in forward.order if n in set(lora))
    cases = {case: names for case, names in cases.items() if case in args.cases.split(",")}
    info: dict[str, Any] = {"model": what, "parameters": params, "export_seconds": export_seconds}
    info["slice_groups"] = hop_groups
    info["blocks"] = len(blocks)
    info["forward_onnx"] = str(forward.onnx_path)
    info["external_data"] = (forward.onnx_path.parent / "forward.onnx.data").exists()
    sizes = {name: int(forward.tensors[name].size) for name in forward.order}
    info["model_bytes"] = 4 * sum(sizes.values())
    info["parent_peak_mb"] = _status("VmHWM") / MB  # the export's memory, not the hop's
    info["cases"] = {}
    for case, trainable in cases.items():
        t0 = time.perf_counter()
        built = build_segment_artifacts(forward, trainable, work / "artifacts")
        info["cases"][case] = {
            "directory": str(built.directory), "trainable_tensors": len(trainable),
            "trainable_parameters": sum(sizes[n] for n in trainable), "bundle_bytes": len(built.blob),
            "artifact_seconds": time.perf_counter() - t0,
        }  # fmt: skip
    return info


def run_child(args: argparse.Namespace, info: dict[str, Any], case: str) -> dict[str, Any]:
    """One measurement in a fresh process, killed above the cap; its reports and where it stopped."""
    cmd = [sys.executable, __file__, "--child", info["cases"][case]["directory"], "--forward", info["forward_onnx"]]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    reports: list[dict[str, Any]] = []
    watch = {"max_rss": 0, "killed": False}
    import threading

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                reports.append(json.loads(line))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    cap = int(args.cap_gb * (1 << 30))
    while proc.poll() is None:
        rss = _rss_of(proc.pid)
        watch["max_rss"] = max(watch["max_rss"], rss)
        if rss > cap:
            watch["killed"] = True
            proc.kill()
        time.sleep(0.1)
    thread.join(timeout=5)
    return {"reports": reports, "returncode": proc.returncode, "watch_max_rss": watch["max_rss"], **watch}


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def summarize(info: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, run in runs.items():
        done = next((r for r in run["reports"] if r["phase"] == "done"), None)
        if done is not None:
            out[case] = {
                "ok": True, "load_peak_mb": done["load_peak"] / MB, "loaded_rss_mb": done["loaded_rss"] / MB,
                "train_peak_mb": done["train_peak"] / MB, "handoff_peak_mb": done["handoff_peak"] / MB,
                "handoff_bytes": done["handoff_bytes"],
                "peak_mb": max(done["load_peak"], done["train_peak"], done["handoff_peak"]) / MB,
                "losses": done["losses"], "median_step_seconds": sorted(done["step_seconds"])[len(done["step_seconds"]) // 2],
            }  # fmt: skip
        else:
            last = run["reports"][-1] if run["reports"] else {"phase": "before start"}
            out[case] = {
                "ok": False, "killed_by_cap": run["killed"], "returncode": run["returncode"],
                "failed_after_phase": last["phase"], "rss_at_failure_mb": run["watch_max_rss"] / MB,
            }  # fmt: skip
    return out


def estimate(info: dict[str, Any], result: dict[str, Any], given: float | None = None) -> dict[str, Any]:
    """Full fine-tuning's memory: weights + gradients + AdamW moments (16 B/param) + the hop's non-weight part
    (``given``: an estimate from another run of the same model, e.g. for a LoRA-only run)."""
    if given:
        return {"full_estimate_mb": given, "from": "--full-estimate-mb"}
    params = info["parameters"]
    states = 16 * params
    hop = result.get("snake-hop", {})
    hop_params = info["cases"].get("snake-hop", {}).get("trainable_parameters", 0)
    extra = None
    if hop.get("ok"):  # hop peak minus its weights and its slice's grads and moments: runtime + activations
        extra = hop["train_peak_mb"] * MB - 4 * params - 12 * hop_params
    return {
        "weights_grads_adamw_mb": states / MB,
        "activations_and_runtime_from_hop_mb": None if extra is None else extra / MB,
        "full_estimate_mb": None if extra is None else (states + extra) / MB,
    }


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("opt-1.3b", "gpt"), default="gpt")
    parser.add_argument("--out", type=Path, default=Path("runs/llm-memory.json"))
    parser.add_argument("--work", type=Path, default=None, help="export and artifacts (default: next to --out)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--slice", type=int, default=3, help="consecutive blocks the snake hop trains")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=18.0, help="kill a measurement above this RSS")
    parser.add_argument("--cases", default="snake-hop,full", help="of snake-hop, full, snake-hop-lora")
    parser.add_argument("--lora-rank", type=int, default=0, help="also build the case snake-hop-lora")
    parser.add_argument("--lora-targets", default="self_attn.q_proj,self_attn.v_proj")
    parser.add_argument(
        "--full-estimate-mb",
        type=float,
        default=None,
        help="full fine-tuning's estimate from another run (for runs without the snake-hop case)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--forward", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))
    work = args.work or args.out.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_cases(args, work)
    runs = {case: run_child(args, info, case) for case in args.cases.split(",")}
    result = summarize(info, runs)
    hop, full = result.get("snake-hop", {}), result.get("full", {})
    full_estimate = estimate(info, result, args.full_estimate_mb)
    against = full["peak_mb"] if full.get("ok") else full_estimate["full_estimate_mb"]
    report = {
        "setup": {"batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                  "optimizer": "adamw", "dtype": "float32", "backend": "ort", "cap_gb": args.cap_gb},
        "model": info, "result": result, "runs": runs, "full_estimate": full_estimate,
        "ratio_peak_to_full": {  # each hop's whole peak (load, train, hand-off) over full fine-tuning's (or its estimate)
            case: r["peak_mb"] / against for case, r in result.items() if case != "full" and r.get("ok") and against
        },
        "ratio_peak": hop["peak_mb"] / full["peak_mb"] if hop.get("ok") and full.get("ok") else None,
        "ratio_train_peak": hop["train_peak_mb"] / full["train_peak_mb"] if hop.get("ok") and full.get("ok") else None,
        "hop_transfer_bytes": {
            **{f"{case}_tensors": 4 * c["trainable_parameters"] for case, c in info["cases"].items() if case != "full"},
            "whole_model": info["model_bytes"]},
        "lora": {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "targets": args.lora_targets}
        if args.lora_rank else "not measured (pass --lora-rank)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {k: report[k] for k in ("result", "full_estimate", "ratio_peak_to_full", "hop_transfer_bytes")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
