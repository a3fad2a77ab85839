"""Screen label-skew methods for the snake trial in one process with plain torch (fast, approximate).

Mirrors the default ``simulate`` snake trial: the same partitions (``coordinator.partitions`` logic),
the same seeded cnn, the planner's rotation for 4 agents and 4 groups (agent ``(r + k) % A`` trains group
``k`` in round ``r``), a fresh AdamW per hop over the segment only, the whole model in ``train()`` (every
BatchNorm layer's running statistics follow the hop's data, as in ONNX Runtime), the same batch order.
Methods (comma-separated flags per variant): ``kd`` (distil from the received model, alpha 4, T 2),
``la`` (logit adjustment: CE on logits + log(local prior)), ``bnmix`` (after a hop the running statistics are
a mixture of the received ones and the hop's, weight 1/agents), ``bnkeep`` (running statistics of groups
the hop did not train are kept as received).

    PYTHONPATH=$PWD python tools/skew_screen.py --partitions dirichlet:0.3 --seeds 0 1 2 \
        --variants base kd la kd,la --out /tmp/screen.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_agent.data import load_dataset, parse_partition, partition, split_holdout, to_float
from edge_agent.trainer import TrainSpec, batch_order
from models import InputSpec, build_model

GROUPS = ("conv0", "conv1", "fc", "head")


def shares(y: np.ndarray, agents: int, spec: str, seed: int, cap: int) -> list[np.ndarray]:
    parts = partition(y, agents, parse_partition(spec), seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for idx in parts:
        if cap and len(idx) > cap:
            idx = np.sort(rng.permutation(idx)[:cap])
        out.append(idx)
    return out


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def hop(model: nn.Module, group: str, x: torch.Tensor, y: torch.Tensor, seed: int, flags: set[str],
        agents: int, lr: float) -> None:  # fmt: skip
    params = [p for n, p in model.named_parameters() if n.split(".")[0] == group]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    received = bn_state(model)
    teacher = None
    if "kd" in flags:
        model.eval()
        with torch.no_grad():
            teacher = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])
    counts = torch.bincount(y, minlength=10).float()
    log_prior = torch.log((counts + 1.0) / (counts.sum() + 10.0))
    tau = 1.0 if "la" in flags else 0.0
    model.train()
    for idx, _ in batch_order(TrainSpec(seed=seed), len(x)):
        idx_t = torch.from_numpy(idx)
        logits = model(x[idx_t])
        loss = F.cross_entropy(logits + tau * log_prior, y[idx_t])
        if teacher is not None:
            t = 2.0
            kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher[idx_t] / t, 1), log_target=True,
                          reduction="batchmean")  # fmt: skip
            loss = loss + 4.0 * t * t * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    for k, before in received.items():
        if "bnkeep" in flags and k.split(".")[0] != group:
            state[k].copy_(before)
    if "bnmix" in flags:
        w = 1.0 / agents
        for k in received:
            if k.endswith("running_mean"):
                vk = k.replace("running_mean", "running_var")
                m0, v0, m1, v1 = received[k], received[vk], state[k].clone(), state[vk].clone()
                m = (1 - w) * m0 + w * m1
                second = (1 - w) * (v0 + m0 * m0) + w * (v1 + m1 * m1)
                state[k].copy_(m)
                state[vk].copy_(second - m * m)


def trial(spec: str, seed: int, flags: set[str], agents: int, rounds: int, cap: int, ds: object) -> list[float]:
    x_all, y_all = ds.x_train, ds.y_train  # type: ignore[attr-defined]
    data = []
    for i, idx in enumerate(shares(y_all, agents, spec, seed, cap)):
        x, y, _, _ = split_holdout(x_all[idx], y_all[idx], 0.1, seed=seed + i)
        data.append((torch.from_numpy(to_float(x)), torch.from_numpy(y.astype(np.int64))))
    torch.manual_seed(seed)
    model = build_model("cnn", InputSpec())
    xt = torch.from_numpy(to_float(ds.x_test))  # type: ignore[attr-defined]
    yt = torch.from_numpy(ds.y_test.astype(np.int64))  # type: ignore[attr-defined]
    accs, h = [], 0
    for r in range(rounds):
        lr = 1e-3
        if "cos" in flags:
            lr = 1e-3 * 0.5 * (1 + np.cos(np.pi * r / rounds))
        for k, group in enumerate(GROUPS):
            a = (r + k) % agents
            hop(model, group, *data[a], seed + h, flags, agents, lr)
            h += 1
        accs.append(evaluate(model, xt, yt))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", nargs="+", default=["dirichlet:0.3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cap", type=int, default=3000)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    results = []
    for part in args.partitions:
        for v in args.variants:
            flags = set(v.split(",")) - {"base"}
            finals = []
            for s in args.seeds:
                t0 = time.time()
                accs = trial(part, s, flags, 4, args.rounds, args.cap, ds)
                finals.append(accs[-1])
                results.append({"partition": part, "variant": v, "seed": s, "acc": accs})
                print(f"{part} {v} seed {s}: {' '.join(f'{a:.3f}' for a in accs)} ({time.time() - t0:.0f}s)",
                      flush=True)  # fmt: skip
            print(f"== {part} {v}: median {np.median(finals):.3f} mean {np.mean(finals):.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
