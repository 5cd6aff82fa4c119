"""Data flows: HotpotQA -> episode scripts (``prepare_data``) -> episodes with distractors
(``synthesize_distractors``).

Both steps are deterministic for given inputs and can be slow (a full HotpotQA download, LLM
distractor synthesis), so their tasks are cached by input hash with persisted results; both
touch the outside (hub, LLM), so they retry with exponential backoff. Underneath,
``prepare_scripts`` and ``synthesize`` keep their own hash-keyed outputs and ``synthesize``
resumes a half-finished run episode by episode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from agemem import tracking
from agemem.data.distractors import EPISODES_STATS, synth_settings_hash, synthesize
from agemem.data.episodes_io import read_json
from agemem.data.hotpot import resolve_source
from agemem.data.prepare import SCRIPTS_STATS, input_hash, prepare_scripts, scripts_path
from flows.common import OUTSIDE_RETRIES, cache_policy, load, mark_cached, run_cached, stage

DATA_STATS_KEY = "agemem-data-stats"


def source_files(settings: Any) -> list[str]:
    """Local files behind ``data.source`` (empty for a hub dataset: its name is in the key)."""
    _, _, files = resolve_source(settings.data.source)
    return [str(f) for f in files]


@task(name="prepare-scripts", cache_policy=cache_policy(files=("files",), hasher=input_hash), **OUTSIDE_RETRIES)
def prepare_scripts_task(settings: Any, files: list[str]) -> dict[str, Any]:
    """Load HotpotQA (download when it is a hub name) and write ``scripts.jsonl``."""
    path = prepare_scripts(settings)
    return {"scripts": str(path), "stats": read_json(path.with_name(SCRIPTS_STATS)) or {}}


@task(
    name="synthesize-distractors",
    cache_policy=cache_policy(files=("scripts",), hasher=synth_settings_hash),
    **OUTSIDE_RETRIES,
)
def synthesize_task(settings: Any, scripts: str) -> dict[str, Any]:
    """Fill the stage-2 distractor slots (offline or LLM) and write ``episodes.jsonl``."""
    path = synthesize(settings, Path(scripts))
    return {"episodes": str(path), "stats": read_json(path.with_name(EPISODES_STATS)) or {}}


def _stats_rows(stats: dict[str, Any], prefix: str) -> list[dict[str, str]]:
    rows = []
    for key, value in stats.items():
        if key in ("settings", "input_hash", "scripts_sha256", "episodes_sha256"):
            continue
        rows.append({"metric": f"{prefix}{key}", "value": json.dumps(value) if isinstance(value, (dict, list))
                     else str(value)})
    return rows


def _numeric(stats: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, dict) and key.startswith(("by_", "distractors_by")):
            out.update({f"{prefix}{key}.{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return out


@flow(name="prepare-data")
def prepare_data(profile: str = "smoke", overrides: list[str] | None = None,
                 parent_run_id: str | None = None) -> dict[str, Any]:
    """HotpotQA -> ``scripts.jsonl``; publishes the data stats table (artifact ``agemem-data-stats``)."""
    logger = get_run_logger()
    settings = load(profile, overrides)
    with stage(settings, parent_run_id, "prepare_data") as run_id:
        out, cached = run_cached(prepare_scripts_task, settings, ["scripts"], settings=settings,
                                 files=source_files(settings))
        logger.info("scripts: %s (%s)", out["scripts"], "cached: not redone" if cached else "built")
        tracking.log_metrics(settings, run_id, _numeric(out["stats"], "data."))
        mark_cached(settings, run_id, cached)
    create_table_artifact(_stats_rows(out["stats"], "scripts."), key=DATA_STATS_KEY,
                          description=f"Episode scripts from {settings.data.source}")
    return {**out, "cached": cached}


@flow(name="synthesize-distractors")
def synthesize_distractors(profile: str = "smoke", overrides: list[str] | None = None,
                           scripts: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Scripts -> ``episodes.jsonl`` (stage-2 distractors filled); publishes the data stats table."""
    logger = get_run_logger()
    settings = load(profile, overrides)
    src = scripts or str(scripts_path(settings))
    if not Path(src).is_file():
        raise FileNotFoundError(f"{src}: no scripts file; run the prepare-data flow first")
    with stage(settings, parent_run_id, "synthesize_distractors") as run_id:
        out, cached = run_cached(synthesize_task, settings, ["episodes"], settings=settings, scripts=src)
        logger.info("episodes: %s (%s)", out["episodes"], "cached: not redone" if cached else "built")
        tracking.log_metrics(settings, run_id, _numeric(out["stats"], "data."))
        mark_cached(settings, run_id, cached)
    scripts_stats = _load_stats(Path(src))
    create_table_artifact(_stats_rows(scripts_stats, "scripts.") + _stats_rows(out["stats"], "episodes."),
                          key=DATA_STATS_KEY, description=f"Episodes with distractors: {out['episodes']}")
    return {**out, "cached": cached}


def _load_stats(scripts: Path) -> dict[str, Any]:
    stats = read_json(scripts.with_name(SCRIPTS_STATS))
    return stats if isinstance(stats, dict) else {}


__all__ = ["DATA_STATS_KEY", "prepare_data", "prepare_scripts_task", "synthesize_distractors", "synthesize_task"]
