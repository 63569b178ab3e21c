"""metrics.jsonl (one record per logged step and validation) and the training curve drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from: those steps run again."""
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_training_curve(metrics: list[dict], path: Path, title: str) -> Path:
    """Train loss (left axis) and valid perplexities (right axis, log scale) against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [r for r in metrics if r["split"] == "train"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (alpha KL + (1 - alpha) CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    valid = [r for r in metrics if r["split"] == "valid"]
    if valid:
        ax2 = ax.twinx()
        for key, color, label in (
            ("ppl_memory", "tab:orange", "valid ppl, memory alone"),
            ("ppl_interp", "tab:green", "valid ppl, LM + memory"),
            ("ppl_lm", "tab:gray", "valid ppl, LM alone"),
        ):
            pts = [(r["step"], r[key]) for r in valid if key in r]
            if pts:
                ax2.plot(*zip(*pts), marker="o", ms=3, color=color, label=label, linestyle="--" if key == "ppl_lm" else "-")
        ax2.set_yscale("log")
        ax2.set_ylabel("valid perplexity")
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax.legend(*handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
