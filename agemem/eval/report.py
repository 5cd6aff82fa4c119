"""Markdown report and plot of an evaluation (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

_HEADLINE = (
    ("n", "questions"),
    ("judge_score", "LLM-judge score J"),
    ("em", "exact match"),
    ("f1", "token F1"),
    ("memory_quality", "memory quality"),
    ("joint", "joint sqrt(J x MQ)"),
    ("reward", "reward"),
    ("answered_rate", "answered"),
    ("rounds", "rounds"),
    ("tool_call_count", "tool calls"),
    ("format_errors", "format errors"),
    ("overflow_events", "overflow events"),
    ("judge_fallback_rate", "judge fallback rate"),
    ("errors", "episodes that failed to run"),
)


def _fmt(value: Any) -> str:
    # Whole numbers (counts, "n") print as integers; other floats with three decimals.
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _question_rows(rows: Sequence[Mapping[str, Any]], link: Callable[[Mapping[str, Any]], str | None] | None
                   ) -> list[list[Any]]:
    out = []
    for r in rows:
        target = link(r) if link else None
        episode = f"[{r.get('episode_id')}]({target})" if target else r.get("episode_id")
        judge = str(r.get("judge_source")) + (" (fallback)" if r.get("judge_fallback") else "") + (
            f" ERROR: {r['error'][:80]}" if r.get("error") else "")
        mq = r.get("memory_quality")
        out.append([episode, (r.get("question") or "")[:100], r.get("judge_score"), r.get("em"), r.get("f1"),
                    mq if mq is not None else "-", r.get("reward"), r.get("rounds"), r.get("tool_call_count"),
                    r.get("format_errors"), judge, (r.get("prediction") or "")[:80], (r.get("gold_answer") or "")[:80]])
    return out


def render_markdown(
    aggregates: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    meta: Mapping[str, Any] | None = None,
    plot: str | None = None,
    link: Callable[[Mapping[str, Any]], str | None] | None = None,
    max_rows: int = 50,
) -> str:
    """The report: settings summary, headline metrics, tokens per stage, tool mix, per-question table.

    ``plot``: the image target (a file name beside the report, or a ``data:`` URI to embed it);
    ``link``: a row's transcript link (the episode id links to it). A ``weights`` entry in ``meta``
    (random weights) is repeated as a banner under the title.
    """
    parts = [f"# {title}", ""]
    if meta and meta.get("weights"):
        parts += [f"> **{meta['weights']}**", ""]
    if meta:
        parts += [markdown_table(["setting", "value"], [[k, v] for k, v in meta.items()]), ""]
    parts += ["## Aggregates", "", markdown_table(
        ["metric", "value"], [[label, aggregates.get(key, 0.0)] for key, label in _HEADLINE])]
    parts += ["", "## Prompt tokens per stage (mean per question)", "", markdown_table(
        ["stage", "model tokens", "injected prompt tokens"],
        [[s, aggregates.get(f"model_tokens_stage{s}", 0.0), aggregates.get(f"injected_tokens_stage{s}", 0.0)]
         for s in ("1", "2", "3")])]
    tools = sorted((k.split(".", 1)[1], v) for k, v in aggregates.items() if k.startswith("tools."))
    if tools:
        parts += ["", "## Tool calls by name (mean per question)", "", markdown_table(["tool", "calls"], tools)]
    if plot:
        parts += ["", f"![score distributions and tool use]({plot})"]
    shown = list(rows)[:max_rows]
    parts += ["", f"## Per question ({len(shown)} of {len(rows)}; the episode links to its transcript)", "",
              markdown_table(["episode", "question", "J", "EM", "F1", "MQ", "reward", "rounds", "tools", "fmt err",
                              "judge", "prediction", "gold"], _question_rows(shown, link))]
    return "\n".join(parts) + "\n"


#: Columns of the checkpoint comparison (aggregate key, header).
COMPARED = (("judge_score", "J"), ("em", "EM"), ("f1", "F1"), ("memory_quality", "MQ"), ("reward", "reward"),
            ("tool_call_count", "tool calls / q"), ("format_errors", "format errors / q"),
            ("answered_rate", "answered"), ("rounds", "rounds"))


def comparison_markdown(results: Mapping[str, Mapping[str, float]]) -> str:
    """One row per checkpoint (e.g. base / warm start / GRPO), the same episodes and judge for all."""
    rows = [[label, *(agg.get(key, 0.0) for key, _ in COMPARED)] for label, agg in results.items()]
    return "\n".join(["## Checkpoints compared (same questions, same judge)", "",
                      markdown_table(["checkpoint", *(h for _, h in COMPARED)], rows)]) + "\n"


def write_plot(aggregates: Mapping[str, float], rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Reward and J distributions plus the tool-use mix, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bins = [i / 10 for i in range(11)]
    ax1.hist([float(r.get("judge_score") or 0.0) for r in rows], bins=bins, alpha=0.6, label="J (judge)")
    rewards = [float(r.get("reward") or 0.0) for r in rows]
    lo, hi = min(rewards + [0.0]), max(rewards + [1.0])
    ax1.hist(rewards, bins=10, range=(lo, hi), alpha=0.6, label="reward")
    ax1.set_title(f"Score distributions (n={len(rows)})")
    ax1.set_xlabel("value")
    ax1.set_ylabel("questions")
    ax1.legend()
    tools = sorted((k.split(".", 1)[1], v) for k, v in aggregates.items() if k.startswith("tools."))
    if tools:
        ax2.barh([t for t, _ in tools], [v for _, v in tools])
    else:
        ax2.text(0.5, 0.5, "no tool calls", ha="center", va="center")
    ax2.set_title("Tool calls per question")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["markdown_table", "render_markdown", "write_plot"]
