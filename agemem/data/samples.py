"""Sample episodes built the way the pipeline builds them, without writing files.

``agemem episode``, the benchmarks and the tests need a few ready episodes. They get them from the
same path the pipeline takes (:func:`agemem.data.hotpot.load_records`, then
:func:`agemem.data.prepare.build_scripts`, then offline distractors), so the demo and the engine
tests run on episodes the pipeline really produces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agemem.data.distractors import OfflineDistractors
from agemem.data.hotpot import load_records
from agemem.data.prepare import build_scripts
from agemem.data.records import EpisodeScript

if TYPE_CHECKING:
    from agemem.settings import Settings


def sample_episodes(settings: "Settings") -> list[EpisodeScript]:
    """Every episode of ``data.source`` (``data.limit`` applies) with offline distractors filled."""
    scripts = build_scripts(load_records(settings), settings)
    offline = OfflineDistractors(scripts, settings.data.seed, settings.data.distractor_max_chars)
    return [offline.fill(script) for script in scripts]


def sample_episode(settings: "Settings", index: int) -> EpisodeScript:
    """Episode ``index`` of :func:`sample_episodes`; ``IndexError`` names the valid range."""
    episodes = sample_episodes(settings)
    if not 0 <= index < len(episodes):
        raise IndexError(f"episode index {index} out of range: {settings.data.source} gives {len(episodes)} "
                         f"episodes (0..{len(episodes) - 1})")
    return episodes[index]


__all__ = ["sample_episode", "sample_episodes"]
