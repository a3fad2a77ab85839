"""Language-model trials in reports: test perplexity per round (the base model at round 0), per held-out
source before and after, and the sampled continuations of the same prompts before and after.

Used by a single run (``lm_report.md`` and ``perplexity_rounds.png`` in its directory) and by ``compare``
(a section of ``report.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOT = "perplexity_rounds.png"


def is_lm(summary: dict[str, Any]) -> bool:
    return "final_perplexity" in summary and not summary.get("failed")


def name_of(summary: dict[str, Any]) -> str:
    return f"{summary.get('variant', summary['algorithm'])} / {summary['partition']}"


def curve(summary: dict[str, Any]) -> list[tuple[int, float]]:
    """(round, test perplexity) from round 0 (the base model) through every evaluated round."""
    points = [(0, float(summary["base_perplexity"]))]
    points += [(r["round"] + 1, math.exp(min(r["test_loss"], 700.0))) for r in summary.get("round_test", [])]
    if len(points) == 1:  # rounds not evaluated: the final model only
        points.append((int(summary["rounds"]), float(summary["final_perplexity"])))
    return points


def markdown(summaries: Sequence[dict[str, Any]], image: str = PLOT) -> list[str]:
    """The report's language-model section (empty when no run trained one)."""
    runs = [s for s in summaries if is_lm(s)]
    if not runs:
        return []
    sources = list(runs[0]["per_source"])
    lines = ["## Test perplexity (held-out part of every source; base -> final)", "",
             "| run | overall | " + " | ".join(sources) + " | MB total | wall s |",
             "|---|---|" + "---|" * len(sources) + "---|---|"]  # fmt: skip
    for s in runs:
        cells = [f"{s['per_source'][n]['base']:.2f} -> {s['per_source'][n]['final']:.2f}" for n in sources]
        lines.append(f"| {name_of(s)} | {s['base_perplexity']:.2f} -> {s['final_perplexity']:.2f} | "
                     + " | ".join(cells) + f" | {s['bytes_total'] / 1e6:.1f} | {s['wall_s']:.1f} |")  # fmt: skip
    lines += ["", "Per round: " + "; ".join(f"{name_of(s)}: " + ", ".join(f"{p:.2f}" for _, p in curve(s))
                                            for s in runs), ""]  # fmt: skip
    lines += [f"![test perplexity per round]({image})", "", "## Sampled continuations (same prompt and seed)", ""]
    for s in runs:
        lines += [f"### {name_of(s)}", ""]
        for sample in s.get("samples", []):
            lines += [f"- prompt {sample['prompt']!r}", f"  - base:  {sample['base']!r}",
                      f"  - final: {sample['final']!r}"]  # fmt: skip
        lines.append("")
    return lines


def plot(summaries: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """``perplexity_rounds.png``: test perplexity per round of every language-model run."""
    runs = [s for s in summaries if is_lm(s)]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in runs:
        xs, ys = zip(*curve(s), strict=True)
        ax.plot(xs, ys, marker="o", label=name_of(s))
    ax.set(xlabel="round (0 = base model)", ylabel="test perplexity", title="Test perplexity per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_run_report(summary: dict[str, Any], out: Path) -> Path:
    """A single run's ``lm_report.md`` and plot."""
    plot([summary], out)
    title = f"# {summary['model']} on {summary['dataset']}: {summary['algorithm']}, {summary['num_agents']} agents"
    path = out / "lm_report.md"
    path.write_text("\n".join([title, "", *markdown([summary])]) + "\n")
    return path
