"""Predictions in the format of HotpotQA's official evaluation script (``hotpot_evaluate_v1.py``).

``hotpot_pred.json`` is ``{"answer": {id: text}, "sp": {}}`` (no supporting-fact predictions:
the agent answers, it does not cite sentences, so the script's sp and joint metrics are zero);
``hotpot_gold.json`` holds the evaluated questions as the script reads its gold file (``_id``,
``question``, ``answer``, ``supporting_facts`` as ``[title, sent_id]``). The script averages over
the gold file, so scoring against this subset (not the whole dev set) gives our EM and F1::

    python hotpot_evaluate_v1.py runs/eval/<run>/hotpot_pred.json runs/eval/<run>/hotpot_gold.json
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "hotpot_pred.json"
GOLD_FILE = "hotpot_gold.json"


def official_predictions(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The prediction file: the first row of each question id (unanswered: the empty answer)."""
    answers: dict[str, str] = {}
    repeats = 0
    for row in rows:
        qid = str(row.get("record_id") or row.get("episode_id") or "")
        if qid in answers:
            repeats += 1
            continue
        answers[qid] = str(row.get("prediction") or "")
    if repeats:
        # The format has one answer per question; several episodes of one question (seeds) keep the first.
        logger.warning("hotpot predictions: %d repeated question ids kept their first episode's answer", repeats)
    return {"answer": answers, "sp": {}}


def official_gold(episodes: Sequence["EpisodeScript"]) -> list[dict[str, Any]]:
    """The gold file of the evaluated questions (first episode of each id, as the predictions)."""
    seen: set[str] = set()
    gold = []
    for script in episodes:
        if script.record_id in seen:
            continue
        seen.add(script.record_id)
        gold.append({"_id": script.record_id, "question": script.question, "answer": script.gold_answer or "",
                     "supporting_facts": [[f.title, f.sent_id] for f in script.supporting_facts]})
    return gold


def write_official(out_dir: Path, rows: Sequence[Mapping[str, Any]], episodes: Sequence["EpisodeScript"]) -> Path:
    """Write both files under ``out_dir``; returns the predictions file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = out_dir / PREDICTIONS_FILE
    pred.write_text(json.dumps(official_predictions(rows), ensure_ascii=False, indent=1), encoding="utf-8")
    (out_dir / GOLD_FILE).write_text(json.dumps(official_gold(episodes), ensure_ascii=False, indent=1),
                                     encoding="utf-8")
    return pred


__all__ = ["GOLD_FILE", "PREDICTIONS_FILE", "official_gold", "official_predictions", "write_official"]
