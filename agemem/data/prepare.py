"""HotpotQA -> ``scripts.jsonl`` (+ ``scripts.stats.json``).

Staleness rule (decided here, documented in docs/architecture.md): the output directory name is
fixed (``data.output_dir``), and ``scripts.stats.json`` records ``input_hash``, a hash of every
setting that shapes the scripts plus the identity of the source (path, size and mtime of each
local file; the hub name/config/split otherwise). ``prepare_scripts`` reuses an existing
``scripts.jsonl`` only when that hash matches; a different profile, source or seed rebuilds it, and
``distractors.synthesize`` keys its own outputs on the hash of the scripts it read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from agemem.data.episodes_io import read_json, write_episodes, write_json
from agemem.data.hotpot import load_records, resolve_source
from agemem.data.records import EpisodeScript, HotpotRecord
from agemem.data.scripts import build_script, ensure_eval_split

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

SCRIPTS_FILE = "scripts.jsonl"
SCRIPTS_STATS = "scripts.stats.json"
EPISODES_FILE = "episodes.jsonl"
#: Bump when the script format or builder changes, so old outputs are not reused.
SCRIPTS_VERSION = 1
_SHAPING_FIELDS = (
    "source", "hub_config", "split", "limit", "seed", "stage1_turns",
    "sentences_per_paragraph", "distractor_messages", "eval_fraction",
)  # fmt: skip


def output_dir(settings: "Settings") -> Path:
    return settings.path(settings.data.output_dir)


def scripts_path(settings: "Settings") -> Path:
    """``<data.output_dir>/scripts.jsonl``: where :func:`prepare_scripts` writes."""
    return output_dir(settings) / SCRIPTS_FILE


def episodes_path(settings: "Settings") -> Path:
    """``<data.output_dir>/episodes.jsonl``: where distractor synthesis writes and training reads."""
    return output_dir(settings) / EPISODES_FILE


def input_hash(settings: "Settings") -> str:
    """Hash of what determines ``scripts.jsonl``: shaping settings and the source files' identity."""
    cfg = settings.data
    ident: dict[str, Any] = {"version": SCRIPTS_VERSION, **{f: getattr(cfg, f) for f in _SHAPING_FIELDS}}
    builder, hub_name, files = resolve_source(cfg.source)
    if builder == "hub":
        ident["hub"] = hub_name
    else:
        # size + mtime is what make/rsync trust; hashing 500 MB of JSON on every run is not worth it.
        ident["files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def script_stats(scripts: list[EpisodeScript], tokenizer: Any | None = None) -> dict[str, Any]:
    """Counts per split/type/level and average stage-1 / question size (tokens when a tokenizer is given)."""
    def size(text: str) -> int:
        return len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text.split())

    n = max(1, len(scripts))
    # Tokenising 900k paragraphs is slow; a fixed-stride sample estimates the mean well enough.
    stride = max(1, len(scripts) // 2000)
    sample = scripts[::stride] or scripts
    m = max(1, len(sample))
    return {
        "episodes": len(scripts),
        "by_split": dict(Counter(s.split for s in scripts)),
        "by_type": dict(Counter(str(s.provenance.get("type")) for s in scripts)),
        "by_level": dict(Counter(str(s.provenance.get("level")) for s in scripts)),
        "unlabelled": sum(1 for s in scripts if not s.labelled),
        "size_unit": "tokens" if tokenizer is not None else "words",
        "avg_stage1_size": round(sum(size("\n".join(s.stage1_turns)) for s in sample) / m, 1),
        "avg_question_size": round(sum(size(s.question) for s in sample) / m, 1),
        "avg_paragraphs": round(sum(len(s.titles) for s in scripts) / n, 2),
    }


def _tokenizer(settings: "Settings") -> Any | None:
    return _load_tokenizer(settings.episode.tokenizer)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(name: str) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - stats fall back to words; never fail preparation for them
        logger.warning("tokenizer %s unavailable (%s); stats count words", name, exc)
        return None


def build_scripts(records: Sequence[HotpotRecord], settings: "Settings", *,
                  progress: Callable[[int], None] | None = None) -> list[EpisodeScript]:
    """Episode scripts for ``records`` with the train/eval split decided (every small set gets an eval split).

    ``progress`` receives the number of scripts built since the last call (every 1000).
    """
    scripts = []
    for i, rec in enumerate(records, 1):
        scripts.append(build_script(rec, settings))
        if progress and (i % 1000 == 0 or i == len(records)):
            progress(1000 if i % 1000 == 0 else i % 1000)
    return ensure_eval_split(scripts, settings.data.eval_fraction)


def prepare_scripts(
    settings: "Settings",
    *,
    force: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> Path:
    """Load HotpotQA and write ``<data.output_dir>/scripts.jsonl``; return its path.

    Reuses an existing file whose stats carry the same input hash unless ``force``.
    ``progress(phase, n)`` is called with ``("load", n)`` and ``("scripts", n)`` increments.
    """
    out = scripts_path(settings)
    stats_path = out.with_name(SCRIPTS_STATS)
    key = input_hash(settings)
    old = read_json(stats_path)
    if not force and out.exists() and isinstance(old, dict) and old.get("input_hash") == key:
        logger.info("%s is up to date (input hash %s); reusing it", out, key)
        return out
    t0 = time.perf_counter()
    records = load_records(settings, progress=(lambda n: progress("load", n)) if progress else None)
    t1 = time.perf_counter()
    scripts = build_scripts(records, settings, progress=(lambda n: progress("scripts", n)) if progress else None)
    t2 = time.perf_counter()
    digest = write_episodes(scripts, out)
    stats = {
        "input_hash": key,
        "scripts_sha256": digest,
        "source": settings.data.source,
        "settings": {f: getattr(settings.data, f) for f in _SHAPING_FIELDS},
        **script_stats(scripts, _tokenizer(settings)),
        "seconds": {"load": round(t1 - t0, 2), "scripts": round(t2 - t1, 2)},
    }
    # The stats file is written last: its hash marks the scripts file as complete.
    write_json(stats, stats_path)
    logger.info("wrote %d scripts to %s in %.1fs", len(scripts), out, time.perf_counter() - t0)
    return out
