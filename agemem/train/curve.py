"""The training curve as a picture: reward (mean ± std) and loss per step (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def write_curve_plot(history: Sequence[dict[str, Any]], path: Path, *, title: str = "GRPO training") -> Path | None:
    """Reward and loss per step as one PNG; None when there is no per-step history (verl logs its own)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    steps = [int(h.get("step", i + 1)) for i, h in enumerate(history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    mean = [float(h.get("reward/mean", 0.0)) for h in history]
    std = [float(h.get("reward/std", 0.0)) for h in history]
    ax1.plot(steps, mean, marker="o", label="reward mean")
    ax1.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                     label="± std")
    ax1.set_title("Reward per step")
    ax1.set_xlabel("step")
    ax1.legend()
    if any("train/loss" in h for h in history):
        ax2.plot(steps, [float(h.get("train/loss", 0.0)) for h in history], marker="o", color="tab:red")
    ax2.set_title("Loss per step")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.set_xticks(steps if len(steps) <= 20 else ax.get_xticks())
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["write_curve_plot"]
