"""Learning curve on held-out episodes: base model -> teacher warm start -> GRPO checkpoints, three seeds.

For each seed: the warm start (``agemem.train.sft``) on the train split, then local GRPO from the
warm-started model with a checkpoint every ``--every`` steps. Every checkpoint (and the base and
warm-started models) is evaluated by ``agemem.eval.runner.evaluate`` on the SAME held-out episodes:
the eval split (record-id hash), never trained on. Nothing is tuned on those episodes.

Prints one table per metric group (mean ± std over seeds per checkpoint), writes ``curve.png``
and ``curve.json`` into ``--out``, and checks the criterion of issue 13: after the warm start,
GRPO raises the mean held-out reward over the warm-started checkpoint by more than the spread
across seeds (spread = the sample standard deviation over seeds of the per-seed improvement).

    .venv/bin/python benchmarks/learning_curve.py --model tiny --seeds 1 2 3
    .venv/bin/python benchmarks/learning_curve.py --model smollm2 --seeds 1 2 3 --steps 8 --every 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-gguf"

#: (aggregate key, header) of the printed table.
COLUMNS = (
    ("reward", "reward"), ("judge_score", "J"), ("em", "EM"), ("f1", "F1"), ("memory_quality", "MQ"),
    ("answered_rate", "answered"), ("tool_call_count", "tool calls"), ("format_errors", "format err"),
    ("prompt_tokens_max", "prompt tok"),
)


def settings_for(args: argparse.Namespace, seed: int, runs: Path) -> Any:
    from agemem.settings import load_settings

    over: list[str] = [f"runs_dir={runs}", f"train.seed={seed}", f"data.limit={args.records}",
                       f"train.total_steps={args.steps}", f"train.save_every={args.every}", "train.keep_checkpoints=0",
                       f"train.tasks_per_batch={args.tasks}", f"train.rollouts_per_prompt={args.rollouts}",
                       f"eval.limit={args.eval_episodes}", "eval.split=eval", "warm_start.enabled=true"]
    if args.model == "smollm2":
        over += [f"train.model={args.smollm2}", "train.lora_rank=8", "train.lora_alpha=16"]
    return load_settings("smoke", over + list(args.set or []))


def evaluate_checkpoint(settings: Any, episodes: Path, model: str, out: Path, *,
                        resume: bool = False) -> dict[str, float]:
    from agemem.eval.runner import AGGREGATES_FILE, evaluate

    done = out / AGGREGATES_FILE
    if resume and done.is_file():
        # An interrupted run of this command evaluated this checkpoint already; the warm start and the
        # GRPO checkpoints are reused from their caches the same way.
        return json.loads(done.read_text())["aggregates"]
    return evaluate(settings, episodes, model_path=model, output_dir=out).aggregates  # type: ignore[arg-type]


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """{checkpoint label: held-out aggregates} for one seed."""
    from agemem.data.distractors import synthesize
    from agemem.data.prepare import prepare_scripts
    from agemem.train import checkpoint as ckpt
    from agemem.train.local import output_root, train_local
    from agemem.train.sft import after_warm_start, warm_start

    runs = args.out / f"seed-{seed}"
    settings = settings_for(args, seed, runs)
    episodes = synthesize(settings, prepare_scripts(settings))
    evals = runs / "eval"
    curve: dict[str, dict[str, float]] = {}
    curve["base"] = evaluate_checkpoint(settings, episodes, settings.train.model, evals / "base", resume=args.resume)
    warm = warm_start(settings, episodes)
    grpo = after_warm_start(settings, warm)
    curve["warm start"] = evaluate_checkpoint(grpo, episodes, str(warm.model_dir), evals / "warm", resume=args.resume)
    train_local(grpo, episodes)
    root = output_root(grpo)
    for step in range(args.every, args.steps + 1, args.every):
        directory = ckpt.step_dir(root, step)
        model = directory / "model" if (directory / "model" / "config.json").is_file() else directory / "adapter"
        curve[f"GRPO step {step}"] = evaluate_checkpoint(grpo, episodes, str(model), evals / f"step-{step}",
                                                          resume=args.resume)
    return curve


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_tables(curves: dict[int, dict[str, dict[str, float]]]) -> None:
    labels = list(next(iter(curves.values())))
    print("| checkpoint | " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label in labels:
        cells = [mean_std([c[label].get(key, 0.0) for c in curves.values()]) for key, _ in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    tools = sorted({k for c in curves.values() for agg in c.values() for k in agg if k.startswith("tools.")})
    components = sorted({k for c in curves.values() for agg in c.values() for k in agg if k.startswith("reward.")})
    for title, keys in (("tool calls per question, by tool", tools), ("reward components", components)):
        if not keys:
            continue
        print(f"\n{title}:\n")
        print("| checkpoint | " + " | ".join(k.split(".", 1)[1] for k in keys) + " |")
        print("|---|" + "---|" * len(keys))
        for label in labels:
            print(f"| {label} | " + " | ".join(mean_std([c[label].get(k, 0.0) for c in curves.values()])
                                                for k in keys) + " |")


def criterion(curves: dict[int, dict[str, dict[str, float]]]) -> tuple[bool, float, float]:
    """(met, mean improvement of GRPO's last checkpoint over the warm start, spread over seeds)."""
    last = list(next(iter(curves.values())))[-1]
    deltas = [c[last]["reward"] - c["warm start"]["reward"] for c in curves.values()]
    spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    improvement = statistics.fmean(deltas)
    return improvement > spread, improvement, spread


def plot(curves: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, (("reward", "held-out reward"), ("tool_call_count", "tool calls / question"),
                                       ("format_errors", "format errors / question"))):
        for seed, curve in curves.items():
            ax.plot(labels, [curve[label].get(key, 0.0) for label in labels], marker="o", alpha=0.5, label=f"seed {seed}")
        means = [statistics.fmean(c[label].get(key, 0.0) for c in curves.values()) for label in labels]
        ax.plot(labels, means, color="black", linewidth=2, label="mean")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--smollm2", default=str(SMOLLM2), help="SmolLM2-135M-Instruct GGUF file or folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=4, help="train.tasks_per_batch")
    parser.add_argument("--rollouts", type=int, default=4, help="train.rollouts_per_prompt")
    parser.add_argument("--records", type=int, default=60, help="data.limit (train + held-out eval split)")
    parser.add_argument("--eval-episodes", type=int, default=12, help="held-out episodes evaluated per checkpoint")
    parser.add_argument("--out", type=Path, default=Path("runs/learning-curve"))
    parser.add_argument("--set", action="append", help="settings override, e.g. warm_start.epochs=40")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same command: reuse its held-out evaluations")
    args = parser.parse_args(argv)
    args.out = args.out.resolve() / args.model
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    curves = {seed: run_seed(args, seed) for seed in args.seeds}
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"model={args.model} seeds={args.seeds} steps={args.steps} every={args.every} tasks x rollouts="
          f"{args.tasks}x{args.rollouts} held-out episodes={args.eval_episodes} ({time.perf_counter() - started:.0f}s)\n")
    print_tables(curves)
    met, improvement, spread = criterion(curves)
    print(f"\ncriterion: GRPO's last checkpoint minus the warm start, held-out reward: {improvement:+.3f} "
          f"(spread over seeds {spread:.3f}): {'met' if met else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out / "curve.png")
    (args.out / "curve.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "curves": curves}, indent=2))
    print(f"plot: {args.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
