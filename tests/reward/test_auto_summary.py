"""auto_summary_threshold: the released code ends a stage message at 80 % of the context budget; the
paper preset does not. The preset decides unless episode.auto_summary_threshold is set."""

from __future__ import annotations

from agemem.agent.episode import EpisodeEngine
from agemem.agent.scripted import ScriptedTokenPolicy
from agemem.reward.components import auto_summary_threshold
from agemem.settings import load_settings


def test_presets_and_the_episode_setting_decide_the_threshold() -> None:
    assert auto_summary_threshold(load_settings("paper").episode) is None
    assert auto_summary_threshold(load_settings("smoke", {"episode": {"reward_preset": "official-code"}}).episode) == 0.8
    explicit = load_settings("smoke", {"episode": {"reward_preset": "paper", "auto_summary_threshold": 0.5}})
    assert auto_summary_threshold(explicit.episode) == 0.5
    off = load_settings("smoke", {"episode": {"reward_preset": "official-code", "auto_summary_threshold": 1.0}})
    assert auto_summary_threshold(off.episode) is None


async def test_the_engine_ends_stage_messages_only_past_the_threshold(agent_settings, agent_memory, chat_tokenizer,
                                                                      episode_script, embed) -> None:
    stops = {}
    for name, value in (("paper", None), ("low", 0.2)):
        settings = agent_settings.model_copy(deep=True)
        settings.episode.auto_summary_threshold = value
        engine = EpisodeEngine.from_settings(settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
        result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script),
                                         request_id=f"r-{name}")
        stops[name] = (result.stats.auto_summary_stops, set(result.stats.stage_end.values()))
    assert stops["paper"][0] == 0 and "threshold" not in stops["paper"][1]
    assert stops["low"][0] > 0 and "threshold" in stops["low"][1]
