"""The comparison report: ``compare.json``, ``report.md`` and PNG plots from several trial summaries."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator import lm_report


def reach(summary: dict[str, Any], target: float) -> tuple[int | None, int | None]:
    """(rounds, bytes) when test accuracy first reached ``target``; None if it never did."""
    for r in summary.get("round_test", []):
        if r["test_accuracy"] >= target:
            return r["round"] + 1, r["bytes"]
    return None, None


def row(summary: dict[str, Any], target: float) -> dict[str, Any]:
    agents = summary.get("agents", [])
    rounds, bytes_ = reach(summary, target)
    seed = f" / seed {summary['seed']}" if "seed" in summary else ""
    return {
        "run": f"{label(summary)} / {summary['partition']}{seed}",
        "seed": summary.get("seed"),
        "variant": summary.get("variant", summary["algorithm"]),
        "algorithm": summary["algorithm"],
        "kd_alpha": summary.get("kd_alpha", 0.0),
        "compression": summary.get("compression", "none"),
        "partition": summary["partition"],
        "failed": summary.get("failed"),
        "final_test_accuracy": summary.get("final_test_accuracy"),
        "rounds_to_target": rounds,
        "bytes_to_target": bytes_,
        "bytes_total": summary.get("bytes_total"),
        "peak_rss_mb_max": max((a["peak_rss_mb"] for a in agents), default=None),
        "peak_rss_mb_mean": sum(a["peak_rss_mb"] for a in agents) / len(agents) if agents else None,
        "max_trainable_params": max((a["max_trainable_params"] for a in agents), default=None),
        "wall_s": summary.get("wall_s"),
    }


def over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, partition): medians over its seeds (accuracy also mean, min, max; rounds and bytes
    to target over the seeds that reached it, with how many did), in the order the rows came."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not r["failed"]:
            groups.setdefault((r["variant"], r["partition"]), []).append(r)
    out = []
    for (variant, part), runs in groups.items():
        acc = [r["final_test_accuracy"] for r in runs]
        reached = [r for r in runs if r["rounds_to_target"] is not None]

        def med(key: str, among: Sequence[dict[str, Any]] = runs) -> Any:
            values = [r[key] for r in among if r[key] is not None]
            return float(statistics.median(values)) if values else None

        out.append({
            "run": f"{variant} / {part}", "variant": variant, "algorithm": runs[0]["algorithm"], "partition": part,
            "failed": None, "seeds": len(runs), "final_test_accuracy": med("final_test_accuracy"),
            "accuracy_mean": statistics.fmean(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
            "reached_target": len(reached), "rounds_to_target": med("rounds_to_target", reached),
            "bytes_to_target": med("bytes_to_target", reached), "bytes_total": med("bytes_total"),
            "peak_rss_mb_max": med("peak_rss_mb_max"), "wall_s": med("wall_s"),
        })  # fmt: skip
    return out


def seeds_markdown(rows: Sequence[dict[str, Any]], target: float) -> list[str]:
    head = "| run | seeds | median acc | mean | min | max | reached {t} | median rounds to {t} | median MB to {t} | median MB total |"
    lines = ["", "## Over seeds", "", head.format(t=target), "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['seeds']} | {_fmt(r['final_test_accuracy'])} | {_fmt(r['accuracy_mean'])} | "
            f"{_fmt(r['accuracy_min'])} | {_fmt(r['accuracy_max'])} | {r['reached_target']} | "
            f"{_fmt(r['rounds_to_target'])} | {_fmt(r['bytes_to_target'], 'mb')} | {_fmt(r['bytes_total'], 'mb')} |"
        )
    return lines


def label(summary: dict[str, Any]) -> str:
    """``snake``, ``snake+kd`` ...: the compared variant, or what the summary says about KD."""
    if "variant" in summary:
        return str(summary["variant"])
    return str(summary["algorithm"]) + (f" kd={summary['kd_alpha']:g}" if summary.get("kd_alpha") else "")


def ratios(rows: Sequence[dict[str, Any]], base: str = "fedavg", other: str = "snake") -> list[dict[str, Any]]:
    """Per partition: other/base (variants, e.g. ``snake+kd``) for peak memory (max over agents), total
    bytes and the final accuracy gap in points."""
    out = []
    for part in sorted({r["partition"] for r in rows}):
        pick = {r["variant"]: r for r in rows if r["partition"] == part and not r["failed"]}
        if base in pick and other in pick:
            a, b = pick[other], pick[base]
            out.append({
                "partition": part,
                f"{other}_over_{base}_peak_rss": round(a["peak_rss_mb_max"] / b["peak_rss_mb_max"], 3),
                f"{other}_over_{base}_bytes": round(a["bytes_total"] / b["bytes_total"], 3),
                "accuracy_gap_points": round(100 * (a["final_test_accuracy"] - b["final_test_accuracy"]), 2),
            })  # fmt: skip
    return out


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    if kind == "s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1.5 else f"{value:.0f}"
    return str(value)


def markdown(
    rows: Sequence[dict[str, Any]], rel: Sequence[dict[str, Any]], target: float, title: str,
    seeded: Sequence[dict[str, Any]] = (),
) -> str:  # fmt: skip
    head = "| run | final test acc | rounds to {t} | MB to {t} | MB total | peak RSS max (MiB) | peak RSS mean | max trainable params | wall s |"
    lines = [f"# {title}", "", head.format(t=target), "|" + "---|" * 9]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['run']} | failed: {r['failed']} |" + " |" * 7)
            continue
        lines.append(
            f"| {r['run']} | {_fmt(r['final_test_accuracy'])} | {_fmt(r['rounds_to_target'])} | "
            f"{_fmt(r['bytes_to_target'], 'mb')} | {_fmt(r['bytes_total'], 'mb')} | {_fmt(r['peak_rss_mb_max'])} | "
            f"{_fmt(r['peak_rss_mb_mean'])} | {_fmt(r['max_trainable_params'])} | {_fmt(r['wall_s'], 's')} |"
        )
    if seeded:
        lines += seeds_markdown(seeded, target)
    if rel:
        medians = " (medians over seeds)" if seeded else ""
        lines += ["", f"## Ratios{medians} (measured in this run: same agents, data, broker, rounds)", ""]
        for r in rel:
            lines.append(f"- {r['partition']}: " + ", ".join(f"{k} = {v}" for k, v in r.items() if k != "partition"))
    lines += ["", "![accuracy per round](accuracy_rounds.png)", "![accuracy per byte](accuracy_bytes.png)",
              "![peak memory](peak_memory.png)", ""]  # fmt: skip
    return "\n".join(lines)


def plots(summaries: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in summaries if not s.get("failed")]
    paths = []
    for name, xkey, xlabel in (("accuracy_rounds", "round", "round"), ("accuracy_bytes", "bytes", "cumulative MB")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in done:
            pts = s.get("round_test", [])
            xs = [p[xkey] + 1 if xkey == "round" else p[xkey] / 1e6 for p in pts]
            ax.plot(xs, [p["test_accuracy"] for p in pts], marker="o", label=f"{label(s)} / {s['partition']}")
        ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"Test accuracy per {xlabel.split()[-1]}")
        ax.grid(alpha=0.3)
        if done:  # every run failed: no line, no legend
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(done), 1)
    ids = sorted({a["agent_id"] for s in done for a in s["agents"]})
    for i, s in enumerate(done):
        peaks = {a["agent_id"]: a["peak_rss_mb"] for a in s["agents"]}
        ax.bar([j + i * width for j, agent in enumerate(ids) if agent in peaks], [peaks[a] for a in ids if a in peaks],
               width, label=f"{label(s)} / {s['partition']}")  # fmt: skip
    ax.set_xticks([j + width * (len(done) - 1) / 2 for j in range(len(ids))], ids)
    ax.set(xlabel="agent", ylabel="peak RSS (MiB)", title="Peak memory per agent")
    if done:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out / "peak_memory.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_report(summaries: Sequence[dict[str, Any]], out: Path, target: float, title: str) -> dict[str, Any]:
    rows = [row(s, target) for s in summaries]
    seeded = over_seeds(rows) if any(r["seed"] is not None for r in rows) else []
    base = seeded or rows
    variants = {r["variant"] for r in rows}
    rel = ratios(base) + ratios(base, other="fedprox") + ratios(base, other="split")
    rel += [r for v in sorted(variants) if v.startswith("snake+") for r in ratios(base, base="snake", other=v)]
    result = {"target_accuracy": target, "rows": rows, "over_seeds": seeded, "ratios": rel, "runs": list(summaries)}
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plots(summaries, out)
    lm_report.plot(summaries, out)
    text = markdown(rows, rel, target, title, seeded)
    (out / "report.md").write_text("\n".join([text, *lm_report.markdown(summaries)]))
    return result
