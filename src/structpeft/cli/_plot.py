"""The training-curve PNG: training loss vs step, and the per-epoch evaluation vs epoch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot_training_curve(
    path: Path,
    step_losses: list[float],
    epochs: list[dict[str, Any]],
    *,
    metric: str,
    final: float | None,
    baseline: float | None,
    baseline_kind: str | None,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)

    steps = list(range(1, len(step_losses) + 1))
    finite = [(s, v) for s, v in zip(steps, step_losses, strict=True) if math.isfinite(v)]
    if finite:
        ax1.plot([s for s, _ in finite], [v for _, v in finite], color="tab:blue", alpha=0.35, lw=0.8, label="loss")
        k = max(1, len(finite) // 20)
        if k > 1:
            vals = [v for _, v in finite]
            smooth = [
                sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))
            ]
            ax1.plot([s for s, _ in finite], smooth, color="tab:blue", lw=1.6, label=f"moving mean ({k} steps)")
        ax1.legend(loc="upper right", fontsize=8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss")
    ax1.grid(alpha=0.3)

    key = "accuracy" if metric == "accuracy" else "loss"
    pts = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:orange", label=f"eval {key}")
    if metric == "accuracy" and baseline is not None:
        ax2.axhline(baseline, color="gray", ls="--", label=f"baseline ({baseline_kind}) {baseline:.3f}")
    if final is not None and metric == "accuracy":
        ax2.set_title(f"eval accuracy per epoch (final {final:.4f})")
    else:
        ax2.set_title(f"eval {key} per epoch")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"eval {key}")
    ax2.grid(alpha=0.3)
    if pts or baseline is not None:
        ax2.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))
