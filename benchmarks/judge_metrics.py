"""The offline judge and the memory-quality metric: wall time per 1,000 questions.

Scores ``--questions`` questions (default 1,000) built from the shipped HotpotQA sample
(``agemem.assets.SAMPLE_DATA``, replicated in order until there are enough) through the same
``agemem.reward.judge.Judge`` the episode engine uses, with the settings' offline judge backend:

* answer scoring (``Judge.score_answer``: official HotpotQA EM / token F1), over a mix of
  predictions: the gold answer, the gold answer inside a sentence, and another record's answer;
* memory quality (``Judge.memory_quality_report``: embedding similarity between stored memory
  sentences and the gold supporting sentences), over three memory shapes: the gold paragraphs
  only, every paragraph of the record (an agent storing everything), and two unrelated paragraphs.

Questions are scored one at a time, as the engine does at the end of each episode, so the
per-item latency is what an episode pays. Loading the embedding model is startup, timed apart.

    .venv/bin/python benchmarks/judge_metrics.py
    .venv/bin/python benchmarks/judge_metrics.py --questions 200 --skip-memory
    .venv/bin/python benchmarks/judge_metrics.py --set memory.embedding_device=cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any, Awaitable, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ANSWER_CASES = ("gold", "gold in a sentence", "another record's answer")
MEMORY_CASES = ("gold paragraphs", "every paragraph", "unrelated paragraphs")


def build_questions(records: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` questions from ``records`` (replicated in order), each with predictions and memories."""
    out = []
    for i in range(count):
        raw = records[i % len(records)]
        other = records[(i + 7) % len(records)]
        paragraphs = {str(t): " ".join(s.strip() for s in sents) for t, sents in raw.get("context", [])}
        sentences = {str(t): [s.strip() for s in sents] for t, sents in raw.get("context", [])}
        gold_titles = list(dict.fromkeys(str(t) for t, _ in raw.get("supporting_facts", [])))
        supporting = [sentences[t][k] for t, k in raw.get("supporting_facts", [])
                      if t in sentences and 0 <= k < len(sentences[t])]
        unrelated_ctx = other.get("context", [])[:2]
        unrelated = [" ".join(s.strip() for s in sents) for _, sents in unrelated_ctx]
        answer = str(raw.get("answer") or "")
        out.append({
            "question": str(raw["question"]),
            "gold": answer,
            "predictions": {
                ANSWER_CASES[0]: answer,
                ANSWER_CASES[1]: f"Based on what I stored, the answer is {answer}.",
                ANSWER_CASES[2]: str(other.get("answer") or ""),
            },
            "supporting": supporting,
            # Sentences embedded per call (memory sentences + gold): what memory quality costs.
            "embedded": {
                MEMORY_CASES[0]: sum(len(sentences[t]) for t in gold_titles if t in sentences) + len(supporting),
                MEMORY_CASES[1]: sum(len(v) for v in sentences.values()) + len(supporting),
                MEMORY_CASES[2]: sum(len(sents) for _, sents in unrelated_ctx) + len(supporting),
            },
            "memories": {
                MEMORY_CASES[0]: [paragraphs[t] for t in gold_titles if t in paragraphs],
                MEMORY_CASES[1]: list(paragraphs.values()),
                MEMORY_CASES[2]: unrelated,
            },
        })
    return out


async def time_items(label: str, items: Sequence[Any], score: Callable[[Any], Awaitable[float]]) -> tuple[float, list[float], float]:
    """Score items one by one; (wall seconds, per-item seconds, mean score)."""
    latencies, total = [], 0.0
    start = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        total += await score(item)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    print(f"{label}: {len(items)} items in {wall:.1f} s", file=sys.stderr, flush=True)  # progress; the table is stdout
    return wall, latencies, total / max(1, len(items))


def row(metric: str, case: str, n: int, wall: float, latencies: list[float], mean: float, extra: str = "") -> str:
    import numpy as np

    lat = np.asarray(latencies) * 1000.0
    per_1000 = wall / n * 1000.0
    return (f"| {metric} | {case} | {n} | {wall:.3f} | {per_1000:.2f} | {lat.mean():.3f} | "
            f"{np.percentile(lat, 50):.3f} | {np.percentile(lat, 99):.3f} | {mean:.3f} | {extra} |")


async def main(args: argparse.Namespace) -> None:
    import torch

    from agemem.assets import SAMPLE_DATA
    from agemem.reward.judge import Judge
    from agemem.settings import load_settings

    settings = load_settings(args.profile, list(args.set or []))
    torch.set_num_threads(args.threads)
    judge = Judge.from_settings(settings)
    if not judge.offline:
        raise SystemExit(f"judge backend {settings.judge.backend!r} is not offline: this benchmark times the "
                         "offline judge; pass --set judge.backend=offline")
    records = json.loads(SAMPLE_DATA.read_text())
    questions = build_questions(records, args.questions)
    n = len(questions)

    rows = []
    for case in ANSWER_CASES:
        async def answer(q: dict[str, Any], case: str = case) -> float:
            return (await judge.score_answer(q["question"], q["gold"], q["predictions"][case])).score

        wall, lat, mean = await time_items(f"answer EM/F1, {case}", questions, answer)
        rows.append(row("answer EM/F1", case, n, wall, lat, mean, f"mean {settings.judge.offline_metric}"))

    load_s = None
    if not args.skip_memory:
        from agemem.memory.embedder import get_embedder

        t0 = time.perf_counter()
        get_embedder(settings.memory.embedding_model, settings.memory.embedding_device).encode(["warm-up"])
        load_s = time.perf_counter() - t0
        for case in MEMORY_CASES:
            async def memory(q: dict[str, Any], case: str = case) -> float:
                return (await judge.memory_quality_report(q["memories"][case], q["supporting"])).score

            wall, lat, mean = await time_items(f"memory quality, {case}", questions, memory)
            embedded = sum(q["embedded"][case] for q in questions) / n
            rows.append(row("memory quality", case, n, wall, lat, mean,
                            f"~{embedded:.0f} sentences embedded/question"))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"embedding device {settings.memory.embedding_device}; questions: {n} "
          f"(shipped sample of {len(records)} records, replicated)")
    if load_s is not None:
        print(f"embedding model load + first encode (startup, not in the table): {load_s:.2f} s")
    print()
    print("| metric | case | questions | wall s | s per 1,000 questions | mean ms/item | p50 ms | p99 ms | "
          "mean score | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in rows:
        print(line)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1000, help="questions to score (default 1000)")
    parser.add_argument("--skip-memory", action="store_true", help="time answer scoring only (no embedding model)")
    parser.add_argument("--profile", default="smoke", help="settings profile (default smoke)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for the embedder (default 1: fastest measured on 2 shared cores)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="settings override, repeatable")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
