"""Data flows: HotpotQA -> episode scripts (``prepare_data``) -> episodes with distractors
(``synthesize_distractors``).

Both steps are deterministic for given inputs and can be slow (a full HotpotQA download, LLM
distractor synthesis), so their tasks are cached by input hash with persisted results; both
touch the outside (hub, LLM), so they retry with exponential backoff. Underneath,
``prepare_scripts`` and ``synthesize`` keep their own hash-keyed outputs and ``synthesize``
resumes a half-finished run episode by episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from agemem import tracking
from agemem.data.distractors import EPISODES_STATS, synth_settings_hash, synthesize
from agemem.data.episodes_io import read_json
from agemem.data.hotpot import resolve_source
from agemem.data.prepare import SCRIPTS_STATS, input_hash, prepare_scripts, scripts_path
from agemem.logs import LogProgress
from flows.common import OUTSIDE_RETRIES, Profile, cache_policy, load, mark_cached, md_table, run_cached, stage

DATA_STATS_KEY = "agemem-data-stats"


def source_files(settings: Any) -> list[str]:
    """Local files behind ``data.source`` (empty for a hub dataset: its name is in the key)."""
    _, _, files = resolve_source(settings.data.source)
    return [str(f) for f in files]


@task(name="prepare-scripts", cache_policy=cache_policy(files=("files",), hasher=input_hash, exclude=("force",)),
      **OUTSIDE_RETRIES)
def prepare_scripts_task(settings: Any, files: list[str], force: bool = False) -> dict[str, Any]:
    """Load HotpotQA (download when it is a hub name) and write ``scripts.jsonl``."""
    path = prepare_scripts(settings, force=force)
    return {"scripts": str(path), "stats": read_json(path.with_name(SCRIPTS_STATS)) or {}}


@task(
    name="synthesize-distractors",
    cache_policy=cache_policy(files=("scripts",), hasher=synth_settings_hash, exclude=("force",)),
    **OUTSIDE_RETRIES,
)
def synthesize_task(settings: Any, scripts: str, force: bool = False) -> dict[str, Any]:
    """Fill the stage-2 distractor slots (offline or LLM) and write ``episodes.jsonl``."""
    path = synthesize(settings, Path(scripts), force=force,
                      progress=LogProgress(get_run_logger(), "episodes with distractors"))
    return {"episodes": str(path), "stats": read_json(path.with_name(EPISODES_STATS)) or {}}


#: Bookkeeping in the stats files that says nothing to a reader of the UI.
_HIDDEN = frozenset({"settings", "input_hash", "scripts_sha256", "episodes_sha256"})


def _cell(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def stats_markdown(title: str, sections: list[tuple[str, dict[str, Any]]]) -> str:
    """Data statistics as readable tables: one row per number, breakdowns (``by_split``, ...) as
    ``name: value`` lists, counts as integers; bookkeeping hashes left out."""
    lines = [f"# {title}", ""]
    for heading, stats in sections:
        rows = []
        for key, value in stats.items():
            if key in _HIDDEN:
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "-"
            elif isinstance(value, list):
                value = ", ".join(str(v) for v in value) or "-"
            rows.append([key.replace("_", " "), _cell(value)])
        lines += [f"## {heading}", "", md_table(["statistic", "value"], rows), ""]
    return "\n".join(lines)


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
def prepare_data(profile: Profile = "smoke", overrides: list[str] | None = None,
                 parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """HotpotQA -> ``scripts.jsonl``; publishes the data stats (artifact ``agemem-data-stats``).

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings.
        parent_run_id: MLflow run to log under (the pipeline's parent run).
        force: Rebuild even when the inputs are unchanged (ignore the Prefect cache).
    """
    logger = get_run_logger()
    settings = load(profile, overrides)
    with stage(settings, parent_run_id, "prepare_data") as run_id:
        out, cached = run_cached(prepare_scripts_task, settings, ["scripts"], refresh=force, settings=settings,
                                 files=source_files(settings), force=force)
        logger.info("scripts: %s (%s)", out["scripts"], "cached: not redone" if cached else "built")
        tracking.log_metrics(settings, run_id, _numeric(out["stats"], "data."))
        mark_cached(settings, run_id, cached)
    artifact = create_markdown_artifact(
        stats_markdown(f"Episode scripts from {settings.data.source}", [("scripts", out["stats"])]),
        key=DATA_STATS_KEY, description=f"Episode scripts from {settings.data.source}")
    return {**out, "cached": cached, "artifact_id": str(artifact)}


@flow(name="synthesize-distractors")
def synthesize_distractors(profile: Profile = "smoke", overrides: list[str] | None = None,
                           scripts: str | None = None, parent_run_id: str | None = None,
                           force: bool = False) -> dict[str, Any]:
    """Scripts -> ``episodes.jsonl`` (stage-2 distractors filled); publishes the data stats.

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings.
        scripts: scripts.jsonl to read (default: the prepare-data flow's output).
        parent_run_id: MLflow run to log under (the pipeline's parent run).
        force: Rebuild even when the inputs are unchanged (ignore the Prefect cache).
    """
    logger = get_run_logger()
    settings = load(profile, overrides)
    src = scripts or str(scripts_path(settings))
    if not Path(src).is_file():
        raise FileNotFoundError(f"{src}: no scripts file; run the prepare-data flow first")
    with stage(settings, parent_run_id, "synthesize_distractors") as run_id:
        out, cached = run_cached(synthesize_task, settings, ["episodes"], refresh=force, settings=settings,
                                 scripts=src, force=force)
        logger.info("episodes: %s (%s)", out["episodes"], "cached: not redone" if cached else "built")
        tracking.log_metrics(settings, run_id, _numeric(out["stats"], "data."))
        mark_cached(settings, run_id, cached)
    body = stats_markdown(f"Episodes from {settings.data.source}, with distractors",
                          [("scripts", _load_stats(Path(src))), ("episodes", out["stats"])])
    artifact = create_markdown_artifact(body, key=DATA_STATS_KEY, description=f"Episodes: {out['episodes']}")
    return {**out, "cached": cached, "artifact_id": str(artifact)}


def _load_stats(scripts: Path) -> dict[str, Any]:
    stats = read_json(scripts.with_name(SCRIPTS_STATS))
    return stats if isinstance(stats, dict) else {}


__all__ = ["DATA_STATS_KEY", "prepare_data", "prepare_scripts_task", "stats_markdown", "synthesize_distractors",
           "synthesize_task"]
