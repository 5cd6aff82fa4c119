"""Turn a :class:`HotpotRecord` into the three-stage :class:`EpisodeScript`.

Stage 1 is the reference's "casual interaction": a casual opener, then one
``"<title>: <first <=N sentences>"`` line per paragraph (gold and distractor paragraphs mixed),
spread over ``data.stage1_turns`` user turns. Stage 2 is ``data.distractor_messages`` empty slots
that a synthesizer fills later. Stage 3 is the question. Everything is deterministic given the
record and ``data.seed``: the paragraph order and the opener come from an RNG seeded per record.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import TYPE_CHECKING

from agemem.data.records import EpisodeScript, HotpotRecord
from agemem.digests import stable_fraction

if TYPE_CHECKING:
    from agemem.settings import Settings

OPENERS = (
    "Just chatting about a few different topics today; here is some related content, grouped by title:",
    "I've been reading up on a bunch of unrelated things lately, here are my notes by topic:",
    "Nothing urgent, just sharing some stuff I came across, sorted by title:",
    "Casual chat: a few things I found interesting recently, grouped by subject:",
)
CONTINUATIONS = (
    "A few more things along the same lines:",
    "Oh, and some more notes I had:",
    "Continuing from before, a bit more:",
)


def split_for(record_id: str, eval_fraction: float) -> str:
    """``'eval'`` for a stable ``eval_fraction`` share of record ids, else ``'train'``.

    Depends on the id only (not the seed), so a record never moves between splits when the seed
    or the source ordering changes.
    """
    return "eval" if stable_fraction(f"split|{record_id}") < eval_fraction else "train"


def ensure_eval_split(scripts: list[EpisodeScript], eval_fraction: float) -> list[EpisodeScript]:
    """Move the ``ceil(n * eval_fraction)`` lowest-ranked ids to ``eval`` when hashing gave none.

    The id hash alone leaves a small set (8 records, say) with no eval episode about
    one time in six; evaluating training episodes instead would hide that. Larger sets are untouched.
    """
    if eval_fraction <= 0 or len(scripts) < 2 or any(s.split == "eval" for s in scripts):
        return scripts
    want = min(len(scripts) - 1, max(1, math.ceil(len(scripts) * eval_fraction)))
    ranked = sorted(range(len(scripts)), key=lambda i: stable_fraction(f"split|{scripts[i].record_id}"))
    moved = set(ranked[:want])
    return [s.model_copy(update={"split": "eval"}) if i in moved else s for i, s in enumerate(scripts)]


def episode_id_for(record_id: str, seed: int) -> str:
    return hashlib.sha256(f"{record_id}|{seed}".encode()).hexdigest()[:16]


def paragraph_line(title: str, sentences: list[str], max_sentences: int) -> str:
    # HotpotQA sentences carry their own leading spaces; normalise so lines read naturally.
    text = " ".join(s.strip() for s in sentences[:max_sentences] if s.strip())
    return f"{title}: {text}"


def _chunks(items: list[str], n: int) -> list[list[str]]:
    """Split into ``n`` contiguous, near-equal, non-empty chunks (fewer if there are fewer items)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def build_script(record: HotpotRecord, settings: "Settings") -> EpisodeScript:
    """The episode script for one record (deterministic given the record and ``data.seed``)."""
    cfg = settings.data
    rng = random.Random(f"{cfg.seed}|{record.id}")
    paragraphs = [p for p in record.context if p.title.strip() and p.sentences]
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    lines = [paragraph_line(paragraphs[i].title, paragraphs[i].sentences, cfg.sentences_per_paragraph) for i in order]
    turns: list[str] = []
    for k, chunk in enumerate(_chunks(lines, cfg.stage1_turns) if lines else []):
        opener = rng.choice(OPENERS) if k == 0 else rng.choice(CONTINUATIONS)
        turns.append(opener + "\n" + "\n".join(chunk))
    return EpisodeScript(
        episode_id=episode_id_for(record.id, cfg.seed),
        record_id=record.id,
        seed=cfg.seed,
        split=split_for(record.id, cfg.eval_fraction),
        stage1_turns=turns,
        distractor_slots=cfg.distractor_messages,
        question=record.question,
        gold_answer=record.answer,
        supporting_facts=record.supporting_facts,
        titles=[paragraphs[i].title for i in order],
        provenance={"type": record.type, "level": record.level, "source": cfg.source},
    )


def stage1_paragraphs(script: EpisodeScript) -> list[tuple[str, str]]:
    """Recover ``(title, text)`` pairs from the stage-1 turns (for offline distractors).

    :func:`build_script` writes one line per title in ``script.titles`` order, after one opener
    line per turn; a line that does not start with its title is skipped (hand-edited scripts).
    """
    lines = [line for turn in script.stage1_turns for line in turn.split("\n")[1:]]
    out: list[tuple[str, str]] = []
    for title, line in zip(script.titles, lines):
        prefix = title + ": "
        if line.startswith(prefix):
            out.append((title, line[len(prefix) :]))
    return out
