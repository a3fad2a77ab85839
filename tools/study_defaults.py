"""Study which default Snake Learning trial reaches a target test accuracy fast.

Plain-torch simulation of the default P2P snake trial on real Fashion-MNIST:

* ``agents`` agents, IID partition of the 60k training set (``samples_per_agent``
  each, taken from one shared random permutation, no overlap).
* The model's layer groups are split into ``agents`` contiguous segments.
* Round ``r`` visits agents 0..A-1 in order; agent ``i`` trains segment
  ``(i + r) mod A`` for ``epochs`` local epochs (batch ``batch``) with a FRESH
  AdamW optimizer (lr, weight decay) over that segment's parameters only, then
  passes the full model on. Optimizer state never travels.
* BatchNorm: the whole model is in ``train()`` during a hop, so frozen BN
  layers normalise with batch statistics, but the running statistics of every
  frozen group are restored after the hop: only the segment's tensors change.
* After each round the model is evaluated in ``eval()`` on the full 10k test set.

``--modes full`` is the reference: same route, fresh optimizer each hop, but
every agent trains every group (plain sequential fine-tuning).

Variants of the ``cnn`` (``--variants``): ``cnn`` (channels (32, 64)),
``cnn_narrow`` ((16, 32)), ``cnn_wide`` ((64, 128)), ``cnn_deephead`` (head is
Linear-ReLU-Linear, still one group), and ``mlp``.

Writes all results as JSON to ``--out`` and prints a table. Runs configurations
in ``--workers`` processes, each with one torch thread. ``--time-hops`` measures
the wall time per hop alone (no parallel workers) for the listed variants.

Example::

    python tools/study_defaults.py --out /tmp/study.json --variants cnn mlp \
        --batches 64 128 --lrs 1e-3 3e-3 --spas 15000 5000 --rounds 6
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import InputSpec, build_model, layer_groups  # noqa: E402
from models.cnn import CNN, CNNConfig  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST split ("train" or "t10k") as float32 [N,1,28,28] in 0..1 and int64 labels."""
    with gzip.open(DATA_DIR / f"{split}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(DATA_DIR / f"{split}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


def build_variant(name: str) -> nn.Module:
    spec = InputSpec()
    if name == "mlp":
        return build_model("mlp", spec)
    if name == "cnn":
        return build_model("cnn", spec)
    if name == "cnn_narrow":
        return CNN(CNNConfig(channels=(16, 32)))
    if name == "cnn_wide":
        return CNN(CNNConfig(channels=(64, 128)))
    if name == "cnn_deephead":
        model = CNN(CNNConfig())
        h = model.config.hidden
        model.head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, model.config.num_classes))
        return model
    raise KeyError(name)


def split_segments(groups: list[str], n: int) -> list[list[str]]:
    """Split ordered groups into n contiguous, near-equal segments (front segments get the extra)."""
    base, extra = divmod(len(groups), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(groups[start : start + size])
        start += size
    return out


def in_groups(name: str, groups: list[str]) -> bool:
    return any(name.startswith(g + ".") for g in groups)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), bs):
        out = model(x[i : i + bs])
        loss += nn.functional.cross_entropy(out, y[i : i + bs], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + bs]).sum().item()
    return correct / len(x), loss / len(x)


def train_hop(
    model: nn.Module,
    seg: list[str] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    wd: float,
    seed: int,
) -> tuple[float, float, int]:
    """One hop: train ``seg`` (None = everything) on (x, y). Returns (seconds, last-epoch loss, steps)."""
    t0 = time.perf_counter()
    params = []
    for name, p in model.named_parameters():
        trainable = seg is None or in_groups(name, seg)
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    frozen_bufs = {
        name: b.detach().clone() for name, b in model.named_buffers() if seg is not None and not in_groups(name, seg)
    }
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)  # fresh each hop
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps, last_loss = 0, 0.0
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:  # BN cannot use a batch of one
                continue
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            cnt += len(idx)
            steps += 1
        last_loss = tot / max(cnt, 1)
    if frozen_bufs:
        with torch.no_grad():
            bufs = dict(model.named_buffers())
            for name, v in frozen_bufs.items():
                bufs[name].copy_(v)
    for p in model.parameters():
        p.requires_grad_(True)
    return time.perf_counter() - t0, last_loss, steps


_DATA: dict[str, torch.Tensor] = {}


def _data() -> dict[str, torch.Tensor]:
    if not _DATA:
        xtr, ytr = load_idx("train")
        xte, yte = load_idx("t10k")
        _DATA.update(
            xtr=torch.from_numpy(xtr), ytr=torch.from_numpy(ytr), xte=torch.from_numpy(xte), yte=torch.from_numpy(yte)
        )
    return _DATA


def run_config(cfg: dict) -> dict:
    torch.set_num_threads(1)
    d = _data()
    agents, spa = cfg["agents"], cfg["spa"]
    perm = torch.randperm(len(d["xtr"]), generator=torch.Generator().manual_seed(cfg["data_seed"]))
    assert agents * spa <= len(perm)
    parts = [perm[a * spa : (a + 1) * spa] for a in range(agents)]
    xs = [d["xtr"][p].contiguous() for p in parts]
    ys = [d["ytr"][p].contiguous() for p in parts]

    torch.manual_seed(cfg["model_seed"])
    model = build_variant(cfg["variant"])
    groups = layer_groups(model)
    segs = split_segments(groups, agents)
    n_params = sum(p.numel() for p in model.parameters())

    acc0, _ = evaluate(model, d["xte"], d["yte"])
    rounds, hops = [], []
    t_start = time.perf_counter()
    for r in range(cfg["rounds"]):
        for i in range(agents):
            s = (i + r) % agents
            seg = None if cfg["mode"] == "full" else segs[s]
            secs, loss, steps = train_hop(
                model,
                seg,
                xs[i],
                ys[i],
                cfg["epochs"],
                cfg["batch"],
                cfg["lr"],
                cfg["wd"],
                seed=1000 * r + i + 7919 * cfg["model_seed"],
            )
            hops.append(
                {
                    "round": r,
                    "agent": i,
                    "segment": s,
                    "groups": seg,
                    "seconds": secs,
                    "train_loss": loss,
                    "steps": steps,
                }
            )
        acc, tl = evaluate(model, d["xte"], d["yte"])
        rounds.append({"round": r + 1, "test_acc": acc, "test_loss": tl})
    accs = [x["test_acc"] for x in rounds]

    def first(th: float) -> int | None:
        return next((k + 1 for k, a in enumerate(accs) if a >= th), None)

    hop_secs = [h["seconds"] for h in hops]
    return {
        **cfg,
        "groups": groups,
        "segments": segs,
        "params": n_params,
        "init_acc": acc0,
        "rounds_detail": rounds,
        "test_acc": accs,
        "first_round_085": first(0.85),
        "first_round_087": first(0.87),
        "best_acc": max(accs),
        "final_acc": accs[-1],
        "hops": hops,
        "mean_hop_s": float(np.mean(hop_secs)),
        "hop_s_by_segment": {
            str(s): float(np.mean([h["seconds"] for h in hops if h["segment"] == s])) for s in range(agents)
        },
        "total_s": time.perf_counter() - t_start,
    }


def time_hops(variant: str, batch: int, spa: int, mode: str, reps: int = 1) -> dict:
    """Wall time of each segment's hop, alone, one thread (model after one warm-up hop)."""
    torch.set_num_threads(1)
    d = _data()
    x, y = d["xtr"][:spa].contiguous(), d["ytr"][:spa].contiguous()
    torch.manual_seed(0)
    model = build_variant(variant)
    segs = split_segments(layer_groups(model), 4)
    out = {}
    train_hop(model, segs[0], x[:2000], y[:2000], 1, batch, 1e-3, 0.01, 0)  # warm-up
    targets = [None] if mode == "full" else segs
    for k, seg in enumerate(targets):
        ts = [train_hop(model, seg, x, y, 1, batch, 1e-3, 0.01, rep)[0] for rep in range(reps)]
        out["all" if seg is None else str(k)] = min(ts)
    t0 = time.perf_counter()
    evaluate(model, d["xte"], d["yte"])
    out["eval_10k"] = time.perf_counter() - t0
    return {"variant": variant, "batch": batch, "spa": spa, "mode": mode, "hop_s": out}


def fmt_row(res: dict) -> str:
    accs = " ".join(f"{a:.4f}" for a in res["test_acc"])
    return (
        f"{res['variant']:13s} {res['mode']:5s} B={res['batch']:<4d} lr={res['lr']:<6g} spa={res['spa']:<6d} "
        f"| {accs} | r85={res['first_round_085']} r87={res['first_round_087']} "
        f"| hop={res['mean_hop_s']:.2f}s total={res['total_s']:.0f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variants", nargs="+", default=["cnn", "mlp"])
    ap.add_argument("--modes", nargs="+", default=["snake"], choices=["snake", "full"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--spas", type=int, nargs="+", default=[15000, 5000])
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-hops", action="store_true", help="only time hops (alone, 1 thread), no trials")
    args = ap.parse_args()

    if args.time_hops:
        results = []
        for v, b, spa, mode in itertools.product(args.variants, args.batches, args.spas, args.modes):
            r = time_hops(v, b, spa, mode)
            print(
                f"{v:13s} {mode:5s} B={b:<4d} spa={spa:<6d} "
                + " ".join(f"{k}={s:.2f}s" for k, s in r["hop_s"].items()),
                flush=True,
            )
            results.append(r)
        args.out.write_text(json.dumps({"timing": results}, indent=1))
        return

    cfgs = [
        {
            "variant": v,
            "mode": m,
            "epochs": e,
            "batch": b,
            "lr": lr,
            "spa": spa,
            "wd": args.wd,
            "agents": args.agents,
            "rounds": args.rounds,
            "model_seed": s,
            "data_seed": args.data_seed,
        }
        for v, m, e, b, lr, spa, s in itertools.product(
            args.variants, args.modes, args.epochs, args.batches, args.lrs, args.spas, args.seeds
        )
    ]
    # longest first, so the two workers finish together
    cost = {"cnn_wide": 4.0, "cnn": 1.0, "cnn_deephead": 1.0, "cnn_narrow": 0.4, "mlp": 0.1}
    cfgs.sort(key=lambda c: -cost.get(c["variant"], 1) * c["spa"] * (1.5 if c["mode"] == "full" else 1))
    results = []
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("fork").Pool(args.workers) as pool:
            for res in pool.imap_unordered(run_config, cfgs):
                print(fmt_row(res), flush=True)
                results.append(res)
                args.out.write_text(json.dumps({"results": results}, indent=1))
    else:
        for cfg in cfgs:
            res = run_config(cfg)
            print(fmt_row(res), flush=True)
            results.append(res)
            args.out.write_text(json.dumps({"results": results}, indent=1))
    print(f"# {len(results)} configs in {time.perf_counter() - t0:.0f}s")
    results.sort(key=lambda r: (r["variant"], r["mode"], r["spa"], r["batch"], r["lr"], r["model_seed"]))
    print("\n".join(fmt_row(r) for r in results))
    args.out.write_text(json.dumps({"results": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
