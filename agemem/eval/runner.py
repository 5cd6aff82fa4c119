"""``evaluate``: run the episode engine over an evaluation set and write rows, aggregates, report, plot.

The engine is the one training uses (same tools, budget, judge); only the policy differs
(:mod:`agemem.eval.policies`). The ablations are the episode settings ``episode.use_context_tools``
and ``episode.enable_stage2`` (``agemem eval --no-context-tools / --no-stage2``). An episode that
cannot run (an endpoint down for good) becomes a zero-score row with its error, never a crash; a
judge that times out or answers garbage is retried by the LLM client and the judge, then scored
offline and flagged (``judge_fallback``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agemem.agent.episode import EpisodeEngine
from agemem.data.episodes_io import read_episodes
from agemem.digests import stable_seed
from agemem.eval.metrics import aggregate, episode_row, error_row
from agemem.eval.policies import PolicyHandle, build_policy
from agemem.eval.hotpot_format import write_official
from agemem.eval.report import render_markdown, write_plot
from agemem.reward.score import score_episode
from agemem.train.models import RANDOM_WEIGHTS_NOTE

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

ROWS_FILE = "rows.jsonl"
AGGREGATES_FILE = "aggregates.json"
REPORT_FILE = "report.md"
PLOT_FILE = "plot.png"


TRANSCRIPTS_DIR = "transcripts"


@dataclass
class EvalResult:
    """``label`` names the policy (``[RANDOM WEIGHTS]`` included when it is the tiny random model);
    ``meta`` is the report's settings table; ``title`` its heading."""

    rows: list[dict[str, Any]]
    aggregates: dict[str, float]
    report_path: Path
    plot_path: Path
    output_dir: Path = field(default_factory=Path)
    label: str = ""
    random_weights: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    title: str = ""


def select_episodes(settings: "Settings", episodes_path: Path) -> list["EpisodeScript"]:
    """The evaluation set: ``eval.split`` of the file (all episodes if it has no eval split), ``eval.limit``."""
    episodes = read_episodes(Path(episodes_path))
    split = settings.eval.split
    chosen = episodes if split == "all" else [e for e in episodes if e.split == split]
    if not chosen and split == "eval":
        logger.warning("%s has no eval split; evaluating all %d episodes", episodes_path, len(episodes))
        chosen = episodes
    unlabelled = [e.episode_id for e in chosen if not e.labelled]
    if unlabelled:
        # Judging against an LLM-made reference is judge-on-judge (reference defect 15): refuse, say which.
        raise ValueError(f"{len(unlabelled)} evaluation episodes have no gold answer (e.g. {unlabelled[:3]}); "
                         "evaluate a labelled split")
    if settings.eval.limit is not None:
        chosen = chosen[: settings.eval.limit]
    if not chosen:
        raise ValueError(f"{episodes_path}: no episodes to evaluate")
    return chosen


async def run_rows(settings: "Settings", episodes: list["EpisodeScript"], *, model_path: Path | str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], "PolicyHandle"]:
    """Run every episode (``eval.concurrency`` at a time); returns rows in input order (each with its
    ``transcript`` text) and the policy handle (label, random weights)."""
    handle = build_policy(settings, model_path)
    engine = EpisodeEngine.from_settings(settings, tokenizer=handle.tokenizer)
    gate = asyncio.Semaphore(settings.eval.concurrency)
    done = 0

    async def one(script: "EpisodeScript") -> dict[str, Any]:
        nonlocal done
        async with gate:
            policy = handle.for_script(script)
            sampling: dict[str, Any] = {"temperature": settings.eval.sampling_temperature(settings.episode)}
            if settings.eval.seed is not None:
                sampling["seed"] = stable_seed(settings.eval.seed, script.episode_id)
            try:
                if handle.mode == "tokens":
                    result = await engine.run_tokens(script, policy, request_id=f"eval-{script.episode_id}",
                                                     sampling_overrides=sampling)
                else:
                    result = await engine.run_chat(script, policy, sampling_overrides=sampling)
            except Exception as exc:  # noqa: BLE001 - one failed episode must not lose the others
                logger.warning("episode %s failed: %s", script.episode_id, exc)
                row = error_row(script, f"{type(exc).__name__}: {exc}", split=script.split)
            else:
                row = episode_row(result.extra_fields(), score_episode(result, script), split=script.split)
                row["transcript"] = result.transcript_text()
            done += 1
            if progress:
                progress(done, len(episodes))
            return row

    try:
        rows = list(await asyncio.gather(*(one(s) for s in episodes)))
    finally:
        await engine.aclose()
        if handle.close is not None:
            await handle.close()
    return rows, handle


def _short(label: str, keep: int = 3) -> str:
    """A policy label for a title: a long checkpoint path keeps its last parts (the report's
    settings table has it whole)."""
    head, sep, path = label.partition(":")
    parts = Path(path.split(" [")[0]).parts if sep else ()
    if len(parts) <= keep + 1:
        return label
    return f"{head}:.../{'/'.join(parts[-keep:])}" + label[len(head) + 1 + len(path.split(' [')[0]):]


def transcript_name(row: dict[str, Any]) -> str:
    """``transcripts/<episode id>.md``, relative to the evaluation's output directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(row.get("episode_id") or "episode"))
    return f"{TRANSCRIPTS_DIR}/{safe}.md"


def _write_transcripts(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Each row's transcript to its own file (rows.jsonl keeps the file name, not the text)."""
    for row in rows:
        text = row.pop("transcript", None)
        if text is None:
            continue
        name = transcript_name(row)
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Transcript: {row.get('episode_id')}\n\nQuestion: {row.get('question')}\n\n"
                        f"```text\n{text}\n```\n", encoding="utf-8")
        row["transcript_file"] = name


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], aggregates: dict[str, float], *, title: str,
                  meta: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_transcripts(out_dir, rows)
    with (out_dir / ROWS_FILE).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    (out_dir / AGGREGATES_FILE).write_text(json.dumps({"meta": meta, "aggregates": aggregates}, indent=2, default=str))
    plot = write_plot(aggregates, rows, out_dir / PLOT_FILE)
    report = out_dir / REPORT_FILE
    report.write_text(render_markdown(aggregates, rows, title=title, meta=meta, plot=plot.name,
                                      link=lambda row: row.get("transcript_file")))
    return report, plot


def evaluate(
    settings: "Settings",
    episodes_path: Path,
    *,
    model_path: Path | str | None = None,
    output_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``settings.eval.policy`` (or the checkpoint at ``model_path``) on the eval episodes.

    Writes ``rows.jsonl``, ``aggregates.json``, ``report.md``, ``plot.png`` and HotpotQA's official
    prediction format (``hotpot_pred.json`` with its ``hotpot_gold.json``) under
    ``output_dir`` (default ``<eval.output_dir>/<policy>-<timestamp>``).
    """
    if model_path is not None and settings.eval.policy != "checkpoint":
        settings = settings.model_copy(update={"eval": settings.eval.model_copy(update={"policy": "checkpoint"})})
    episodes = select_episodes(settings, Path(episodes_path))
    started = time.perf_counter()
    rows, handle = asyncio.run(run_rows(settings, episodes, model_path=model_path, progress=progress))
    label = handle.label
    aggregates = aggregate(rows)
    aggregates["eval_seconds"] = time.perf_counter() - started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = output_dir or settings.path(settings.eval.output_dir) / f"{settings.eval.policy}-{stamp}"
    meta = {
        "policy": label,
        "episodes": str(episodes_path),
        "questions": len(rows),
        "judge backend": settings.judge.backend,
        "context tools": settings.episode.use_context_tools,
        "stage 2": settings.episode.enable_stage2,
        "max context tokens": settings.episode.max_context_tokens,
        "temperature": settings.eval.sampling_temperature(settings.episode),
    }
    if handle.random_weights:
        meta["weights"] = RANDOM_WEIGHTS_NOTE
    title = f"AgeMem evaluation: {_short(label)}"
    report, plot = write_outputs(Path(out), rows, aggregates, title=title, meta=meta)
    write_official(Path(out), rows, episodes)
    logger.info("evaluated %d questions of %s: J=%.3f EM=%.3f F1=%.3f MQ=%.3f -> %s", len(rows), label,
                aggregates.get("judge_score", 0), aggregates.get("em", 0), aggregates.get("f1", 0),
                aggregates.get("memory_quality", 0), report)
    return EvalResult(rows, aggregates, report, plot, Path(out), label, handle.random_weights, meta, title)


__all__ = ["EvalResult", "evaluate", "run_rows", "select_episodes", "transcript_name"]
