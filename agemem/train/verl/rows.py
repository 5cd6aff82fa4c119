"""Episode scripts as verl training parquet rows, and back.

One row per episode: ``data_source``, ``prompt`` (chat messages: the system prompt and the first
stage-1 turn, which verl uses for length filtering and logging), ``ability``, ``reward_model``
``{style, ground_truth}``, ``extra_info`` (row index, episode id and the whole stage script as a
JSON string, so the agent loop can replay all three stages) and ``agent_name`` (which registered
agent loop verl runs for the row).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from agemem.data.records import EpisodeScript
from agemem.reward.score import DATA_SOURCE

logger = logging.getLogger(__name__)

ABILITY = "memory_management"
DEFAULT_AGENT_NAME = "staged_memory_agent"


def episode_row(
    episode: EpisodeScript, index: int, *, agent_name: str, system_prompt: str
) -> dict[str, Any]:
    """The verl row for one episode."""
    if not episode.stage1_turns:
        raise ValueError(f"episode {episode.episode_id}: no stage-1 turns")
    return {
        "data_source": DATA_SOURCE,
        "prompt": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": episode.stage1_turns[0]},
        ],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": episode.gold_answer or ""},
        "extra_info": {
            "index": index,
            "episode_id": episode.episode_id,
            "split": episode.split,
            "script": episode.model_dump_json(),
        },
        "agent_name": agent_name,
    }


def write_verl_parquet(
    episodes: Iterable[EpisodeScript],
    path: Path,
    agent_name: str = DEFAULT_AGENT_NAME,
    *,
    system_prompt: str,
) -> Path:
    """Write ``episodes`` as a verl parquet at ``path`` (atomically); returns ``path``.

    Raises ``ValueError`` when there are no episodes or an episode lacks stage-1 turns.
    """
    rows = [episode_row(ep, i, agent_name=agent_name, system_prompt=system_prompt) for i, ep in enumerate(episodes)]
    if not rows:
        raise ValueError(f"no episodes to write to {path}")
    return write_rows(rows, path, what="verl rows")


def write_rows(rows: list[dict[str, Any]], path: Path, *, what: str) -> Path:
    """``rows`` as a parquet file at ``path``, written atomically (a reader never sees half a file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    logger.info("wrote %d %s to %s", len(rows), what, path)
    return path


def decode_script(extra_info: Mapping[str, Any] | None) -> EpisodeScript:
    """The EpisodeScript stored in a row's ``extra_info`` (raises ``ValueError`` with the reason)."""
    if not extra_info or "script" not in extra_info:
        raise ValueError("row has no extra_info.script: was the parquet written by agemem.train.verl.rows?")
    raw = extra_info["script"]
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        return EpisodeScript.model_validate(data)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"extra_info.script is not a valid episode script: {exc}") from exc


def read_verl_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows of a verl parquet as dicts (for checks and the local trainer)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(path)).to_pylist()
