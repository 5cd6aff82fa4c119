"""Fill the stage-2 distractor slots of episode scripts -> ``episodes.jsonl``.

Two synthesizers:

* :class:`OfflineDistractors` turns paragraphs of *other* records (title-disjoint from the episode)
  into casual user messages; deterministic by seed, O(slots) per episode.
* :class:`LLMDistractors` asks the ``llm`` client for plausible but unrelated user messages, parses
  them (list markers such as ``1.``, ``10)``, ``-`` are stripped whole; the reference stripped one
  character, defect 14), rejects invalid ones (mentions the episode's titles, too short or long,
  duplicates) and asks again; after ``data.synth_max_attempts`` a slot gets an offline distractor
  with source ``'fallback'``.

:func:`synthesize` is resumable: completed episodes are appended to ``episodes.jsonl.partial``
(flushed per line) keyed by a hash of the scripts and the synthesis settings; a rerun skips them,
and the final ``episodes.jsonl`` is written atomically in scripts order, so the same inputs give a
byte-identical file however often the run was interrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from agemem.data.episodes_io import (
    EpisodeFileError,
    append_line,
    read_episodes,
    read_json,
    recover_partial,
    write_episodes,
    write_json,
)
from agemem.data.prepare import EPISODES_FILE
from agemem.data.prepare import scripts_path as default_scripts_path
from agemem.data.records import Distractor, EpisodeScript
from agemem.data.scripts import stage1_paragraphs
from agemem.digests import file_sha256
from agemem.llm import LLMClient, LLMError, build_llm_client

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

# EPISODES_FILE: the file name lives with the other data paths (agemem.data.prepare).
EPISODES_STATS = "episodes.stats.json"
PARTIAL_SUFFIX = ".partial"
PARTIAL_META = "episodes.partial.json"
SYNTH_VERSION = 1

OFFLINE_TEMPLATES = (
    "Random thought: I was just reading about {title}. {text}",
    "Totally unrelated, but I learned something today. {text}",
    "Quick aside before I forget: {text} Kind of interesting, right?",
    "A friend brought up {title} at dinner yesterday. {text}",
    "Switching topics for a second. {text} Had you heard about that?",
)
#: Used only when there are no other records to borrow from (e.g. a one-record source).
GENERIC_SMALL_TALK = (
    "The weather has been so unpredictable this week, I never know whether to bring an umbrella.",
    "I tried baking a lemon cake yesterday and it came out way too dense. Any idea why?",
    "I keep hearing about new programming languages; is it worth learning a new one every year?",
    "I watched a documentary about ancient civilisations last night and can't stop thinking about it.",
    "Do you think modern art is harder to appreciate than classical paintings?",
    "My neighbour just adopted a puppy and it has been barking all morning.",
)

_MARKER = re.compile(r"^\s*(?:(?:[-*•·–]+)|(?:\(?\d{1,3}[.):\]]+)|(?:#+))\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------------------------------- parsing
def parse_lines(text: str) -> list[str]:
    """Messages from an LLM reply: one per line, list markers and wrapping quotes removed.

    Drops blank lines, markdown headings and preamble lines ending in ``:``
    (``"Here are 3 messages:"``). ``"10. foo"`` -> ``"foo"`` (the reference gave ``"0. foo"``).
    """
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.endswith(":"):
            continue
        line = _MARKER.sub("", line, count=1).strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'“”":
            line = line[1:-1].strip()
        line = line.strip("“”").strip()
        if line:
            out.append(line)
    return out


def _entity_pattern(titles: Sequence[str]) -> re.Pattern[str] | None:
    """Word-boundary regex of the episode's title entities ("Ed Wood (film)" -> "Ed Wood")."""
    names = set()
    for title in titles:
        base = re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()
        for name in (title.strip(), base):
            if len(name) >= 3:
                names.add(re.escape(name))
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(sorted(names, key=len, reverse=True)) + r")(?!\w)", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


@dataclass
class Validator:
    """Why a candidate distractor is rejected (None = accepted)."""

    titles: Sequence[str]
    question: str
    min_chars: int
    max_chars: int
    seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._entities = _entity_pattern(self.titles)
        self.seen.add(_norm(self.question))

    def reject_reason(self, text: str) -> str | None:
        if len(text) < self.min_chars:
            return "too short"
        if len(text) > self.max_chars:
            return "too long"
        if self._entities is not None and (m := self._entities.search(text)):
            return f"mentions {m.group(0)!r}, an entity of the question's context"
        key = _norm(text)
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        return None


# --------------------------------------------------------------------------------------- offline
def _trim(text: str, max_chars: int) -> str:
    """Whole leading sentences up to ``max_chars`` (at least one sentence, hard-cut if huge)."""
    out = ""
    for sentence in _SENTENCE_END.split(text.strip()):
        candidate = f"{out} {sentence}".strip()
        if len(candidate) > max_chars:
            break
        out = candidate
    return out or text[:max_chars].rsplit(" ", 1)[0].rstrip(" ,;") + "..."


class OfflineDistractors:
    """Distractors from other records' paragraphs, title-disjoint from the episode, seeded per episode."""

    def __init__(self, scripts: Sequence[EpisodeScript], seed: int, max_chars: int = 400) -> None:
        self.seed = seed
        self.max_chars = max_chars
        by_title: dict[str, tuple[str, str, str]] = {}
        for script in scripts:
            for title, text in stage1_paragraphs(script):
                if title not in by_title and text.strip():
                    by_title[title] = (title, text, script.record_id)
        self.pool = list(by_title.values())

    def _message(self, rng: random.Random, title: str, text: str) -> str:
        template = rng.choice(OFFLINE_TEMPLATES)
        budget = max(40, self.max_chars - len(template) - len(title))
        return template.format(title=title, text=_trim(text, min(budget, 240)))

    def draw(self, script: EpisodeScript, n: int, *, salt: str = "offline", exclude: set[str] | None = None) -> list[Distractor]:
        """``n`` distractors for ``script``; ``source`` is ``offline:<record id>`` (or ``'fallback'``)."""
        rng = random.Random(f"{self.seed}|{salt}|{script.episode_id}")
        own = set(script.titles)
        used = set(exclude or ())
        out: list[Distractor] = []
        # Rejection sampling: expected O(1) draws per slot because the pool is mostly disjoint.
        tries = 0
        while len(out) < n and self.pool and tries < 50 * n:
            tries += 1
            title, text, record_id = self.pool[rng.randrange(len(self.pool))]
            if title in own or title in used or record_id == script.record_id:
                continue
            used.add(title)
            source = "fallback" if salt == "fallback" else f"offline:{record_id}"
            out.append(Distractor(text=self._message(rng, title, text), source=source))
        while len(out) < n:  # no other records to borrow from
            line = GENERIC_SMALL_TALK[(len(out) + rng.randrange(len(GENERIC_SMALL_TALK))) % len(GENERIC_SMALL_TALK)]
            out.append(Distractor(text=line, source="fallback" if salt == "fallback" else "offline:generic"))
        return out

    def fill(self, script: EpisodeScript) -> EpisodeScript:
        need = max(0, script.distractor_slots - len(script.distractors))
        new = self.draw(script, need)
        prov = {**script.provenance, "distractors": {"synthesizer": "offline", "model": None, "seed": self.seed}}
        return script.model_copy(update={"distractors": [*script.distractors, *new], "provenance": prov})


# ------------------------------------------------------------------------------------------- LLM
SYSTEM_PROMPT = "You write short messages that a user might casually send to a chat assistant."

USER_PROMPT = """Write {n} different everyday messages that a user might send to a chat assistant.
Each message must be about a topic completely unrelated to this question: "{question}"
Do not mention any of these names or topics: {titles}.
Each message is 1-2 natural sentences ({min_chars}-{max_chars} characters), on a different topic
(for example hobbies, food, travel, weather, work, technology).
Write one message per line, with no numbering, no bullets and no other text.{avoid}"""


class LLMDistractors:
    """LLM-written distractors with validation, regeneration and an offline fallback."""

    def __init__(self, client: LLMClient, settings: "Settings", offline: OfflineDistractors) -> None:
        self.client = client
        self.cfg = settings.data
        self.offline = offline

    def _prompt(self, script: EpisodeScript, n: int, accepted: list[str], rejected: list[str]) -> str:
        avoid = ""
        if accepted:
            avoid += "\nDo not repeat or paraphrase these: " + " | ".join(accepted)
        if rejected:
            # Varying the prompt also varies the reply when the endpoint is seeded.
            avoid += f"\nEarlier attempts were rejected ({'; '.join(sorted(set(rejected)))}); write new ones."
        return USER_PROMPT.format(
            n=n,
            question=script.question,
            titles=", ".join(script.titles[:12]) or "(none)",
            min_chars=self.cfg.distractor_min_chars,
            max_chars=self.cfg.distractor_max_chars,
            avoid=avoid,
        )

    async def fill(self, script: EpisodeScript) -> EpisodeScript:
        need = max(0, script.distractor_slots - len(script.distractors))
        per_call = self.cfg.distractors_per_call or max(1, need)
        calls_budget = self.cfg.synth_max_attempts * math.ceil(need / per_call) if need else 0
        validator = Validator(
            script.titles, script.question, self.cfg.distractor_min_chars, self.cfg.distractor_max_chars
        )
        for d in script.distractors:
            validator.reject_reason(d.text)
        accepted: list[str] = []
        rejected: list[str] = []
        calls = 0
        while len(accepted) < need and calls < calls_budget:
            calls += 1
            want = min(per_call, need - len(accepted))
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self._prompt(script, want, accepted, rejected)},
            ]
            try:
                reply = await self.client.chat(messages)
            except LLMError as exc:
                logger.warning("episode %s: distractor call failed: %s", script.episode_id, exc)
                rejected.append("call failed")
                continue
            lines = parse_lines(reply.text)
            if not lines:
                rejected.append("empty reply")
            for line in lines:
                if len(accepted) >= need:
                    break
                reason = validator.reject_reason(line)
                if reason is None:
                    accepted.append(line)
                else:
                    logger.debug("episode %s: rejected distractor (%s): %r", script.episode_id, reason, line)
                    rejected.append(reason.split(",")[0])
        source = f"llm:{self.client.model}"
        new = [Distractor(text=t, source=source) for t in accepted]
        fallbacks = need - len(new)
        if fallbacks:
            logger.warning("episode %s: %d distractor slot(s) fell back to offline text", script.episode_id, fallbacks)
            new += self.offline.draw(script, fallbacks, salt="fallback")
        prov = {
            **script.provenance,
            "distractors": {
                "synthesizer": "llm",
                "model": self.client.label,
                "seed": self.cfg.seed,
                "llm_seed": self.client.seed,
                "fallbacks": fallbacks,
            },
        }
        return script.model_copy(update={"distractors": [*script.distractors, *new], "provenance": prov})


# ------------------------------------------------------------------------------------- synthesize
def synth_settings_hash(settings: "Settings") -> str:
    """Hash of every setting that changes the synthesized distractors (the scripts file aside)."""
    return synth_hash(settings, "")


def synth_hash(settings: "Settings", scripts_sha256: str) -> str:
    """Hash of the scripts file and every setting that changes the synthesized distractors."""
    cfg = settings.data
    ident: dict[str, object] = {
        "version": SYNTH_VERSION,
        "scripts": scripts_sha256,
        "backend": cfg.distractor_backend,
        "seed": cfg.seed,
        "min_chars": cfg.distractor_min_chars,
        "max_chars": cfg.distractor_max_chars,
    }
    if cfg.distractor_backend == "llm":
        llm = settings.llm
        ident |= {
            "llm": [llm.backend, llm.model, llm.base_url, llm.temperature, llm.max_tokens, llm.seed],
            "attempts": cfg.synth_max_attempts,
            "per_call": cfg.distractors_per_call,
        }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


async def _fill_llm(
    synth: LLMDistractors,
    todo: list[EpisodeScript],
    concurrency: int,
    emit: Callable[[EpisodeScript], None],
) -> None:
    """Fill ``todo`` with ``concurrency`` workers; ``emit`` runs on the loop thread as each completes."""
    queue = iter(todo)

    async def worker() -> None:
        for script in queue:  # a shared iterator: each script is taken by exactly one worker
            emit(await synth.fill(script))

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(todo))):
                group.create_task(worker())
    except BaseExceptionGroup as eg:  # surface the first real error, not the group wrapper
        raise eg.exceptions[0] from eg


async def _run_and_close(
    synth: LLMDistractors,
    todo: list[EpisodeScript],
    concurrency: int,
    emit: Callable[[EpisodeScript], None],
    *,
    close: bool,
) -> None:
    try:
        await _fill_llm(synth, todo, concurrency, emit)
    finally:
        if close:  # a client we built is ours to close; a caller's client stays open
            await synth.client.aclose()


def episodes_path_for(scripts_path: Path) -> Path:
    return scripts_path.with_name(EPISODES_FILE)


def _up_to_date(out: Path, stats_path: Path, key: str) -> bool:
    """True when ``out`` was written from inputs hashing to ``key`` and is unchanged since."""
    old = read_json(stats_path)
    if not (out.exists() and isinstance(old, dict) and old.get("input_hash") == key):
        return False
    recorded, actual = old.get("episodes_sha256"), file_sha256(out)
    if recorded == actual:
        logger.info("%s is up to date (input hash %s); reusing it", out, key)
        return True
    logger.warning("%s changed since it was written (sha256 %s, recorded %s); rebuilding it",
                   out, actual[:12], str(recorded)[:12])
    return False


def _resumable(partial: Path, meta_path: Path, src: Path, key: str, scripts: list[EpisodeScript],
               force: bool) -> dict[str, EpisodeScript]:
    """Episodes a previous run of the same inputs finished (stale work from other inputs is dropped)."""
    meta = read_json(meta_path)
    if force or not isinstance(meta, dict) or meta.get("input_hash") != key:
        partial.unlink(missing_ok=True)
    write_json({"input_hash": key, "scripts": str(src)}, meta_path)
    wanted = {s.episode_id for s in scripts}
    return {k: v for k, v in recover_partial(partial).items() if k in wanted}


def _fill(settings: "Settings", todo: list[EpisodeScript], offline: OfflineDistractors,
          emit: Callable[[EpisodeScript], None], client: LLMClient | None) -> dict[str, int]:
    """Fill ``todo`` with the configured backend, ``emit`` each; returns the LLM usage of this run."""
    if settings.data.distractor_backend == "offline" or not todo:
        for script in todo:
            emit(offline.fill(script))
        return {}
    llm = client or build_llm_client(settings, "llm")
    if llm.offline:
        # The model-free backend would only echo the prompt; the offline algorithm is the real one.
        logger.warning("distractor_backend=llm but llm.backend is offline; using offline distractors")
        for script in todo:
            emit(offline.fill(script))
    else:
        synth = LLMDistractors(llm, settings, offline)
        asyncio.run(_run_and_close(synth, todo, settings.data.synth_concurrency, emit, close=client is None))
    return llm.usage.as_dict()


def _stats(settings: "Settings", key: str, digest: str, final: list[EpisodeScript], resumed: int,
           usage: dict[str, int]) -> dict[str, Any]:
    sources: dict[str, int] = {}
    for ep in final:
        for d in ep.distractors:
            kind = d.source.split(":", 1)[0]
            sources[kind] = sources.get(kind, 0) + 1
    return {"input_hash": key, "episodes_sha256": digest, "episodes": len(final),
            "synthesizer": settings.data.distractor_backend, "distractors_by_source": sources,
            "resumed": resumed, "llm_usage_this_run": usage}


def synthesize(
    settings: "Settings",
    scripts_path: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    client: LLMClient | None = None,
) -> Path:
    """Fill every script's distractor slots; write ``episodes.jsonl`` beside the scripts; return its path.

    ``progress(done, total)`` is called after each episode (resumed ones count as done at start).
    ``client`` overrides the client built from ``settings.llm`` (``llm`` backend only).
    """
    src = Path(scripts_path) if scripts_path is not None else default_scripts_path(settings)
    if not src.is_file():
        raise EpisodeFileError(f"{src}: no scripts file; run `agemem data prepare` first")
    out = episodes_path_for(src)
    stats_path = out.with_name(EPISODES_STATS)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    meta_path = out.with_name(PARTIAL_META)
    scripts = read_episodes(src)
    key = synth_hash(settings, file_sha256(src))
    if not force and _up_to_date(out, stats_path, key):
        if progress:
            progress(len(scripts), len(scripts))
        return out
    done = _resumable(partial, meta_path, src, key, scripts, force)
    todo = [s for s in scripts if s.episode_id not in done]
    logger.info("distractors: %d episodes, %d already done, %d to do", len(scripts), len(done), len(todo))
    if progress:
        progress(len(done), len(scripts))

    offline = OfflineDistractors(scripts, settings.data.seed, settings.data.distractor_max_chars)
    with partial.open("a", encoding="utf-8") as fh:

        def emit(ep: EpisodeScript) -> None:
            append_line(fh, ep)
            done[ep.episode_id] = ep
            if progress:
                progress(len(done), len(scripts))

        usage = _fill(settings, todo, offline, emit, client)

    final = [done[s.episode_id] for s in scripts]
    digest = write_episodes(final, out)
    write_json(_stats(settings, key, digest, final, len(scripts) - len(todo), usage), stats_path)
    partial.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    logger.info("wrote %d episodes to %s", len(final), out)
    return out
