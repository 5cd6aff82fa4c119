"""The model reads short memory ids (M1, M2, ...) and writes them back; the store keeps its own."""

from __future__ import annotations

import re

from agemem.agent.episode import EpisodeEngine
from agemem.agent.memory_ids import MemoryIdAliases
from agemem.agent.scripted import ScriptedTokenPolicy, default_responses

STORE_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _call(name: str, **arguments: str) -> str:
    import json

    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def _replies(episode_script) -> dict:
    responses = default_responses(episode_script)
    responses[(1, 0)] = [
        _call("Add_memory", content="Scott Derrickson is an American director."),
        _call("Add_memory", content="Ed Wood was an American filmmaker."),
        _call("Update_memory", memory_id="M1", content="Scott Derrickson is an American film director."),
        _call("Delete_memory", memory_id="M2"),
        _call("Delete_memory", memory_id="M2"),  # gone now: the error names the alias, not the store id
        _call("Retrieve_memory", query="Derrickson director"),
        "<answer>noted</answer>",
    ]
    return responses


async def _run(settings, memory, tokenizer, script, embed):
    engine = EpisodeEngine.from_settings(settings, tokenizer=tokenizer, memory=memory, encode=embed)
    return await engine.run_tokens(script, ScriptedTokenPolicy(tokenizer, script, _replies(script)))


def _aliased(settings, **episode):
    return settings.model_copy(update={"episode": settings.episode.model_copy(
        update={"alias_memory_ids": True, **episode})})


async def test_the_model_reads_and_writes_aliases_and_the_store_its_ids(agent_settings, agent_memory, chat_tokenizer,
                                                                        episode_script, embed) -> None:
    assert agent_settings.episode.alias_memory_ids  # the default
    settings = _aliased(agent_settings, stage1_max_rounds=7)
    result = await _run(settings, agent_memory, chat_tokenizer, episode_script, embed)
    tools = [t["content"] for t in result.transcript if t["role"] == "tool" and t["stage"] == 1]
    assert tools[0].endswith("memory added (Memory ID: M1)") and tools[1].endswith("memory added (Memory ID: M2)")
    assert tools[2].endswith("memory updated (Memory ID: M1)") and tools[3].endswith("memory deleted (Memory ID: M2)")
    assert tools[4].startswith("[tool error] Delete_memory:") and "M2" in tools[4]
    assert "Scott Derrickson is an American film director. (Memory ID: M1)" in tools[5]
    assert not any(STORE_ID.search(t["content"]) for t in result.transcript)  # no store id reaches the model
    assert [m["content"] for m in result.stats.memories_final] == ["Scott Derrickson is an American film director."]
    assert STORE_ID.fullmatch(result.stats.memories_final[0]["memory_id"])


async def test_without_aliases_the_model_reads_the_store_ids(agent_settings, agent_memory, chat_tokenizer,
                                                             episode_script, embed) -> None:
    plain = agent_settings.model_copy(update={"episode": agent_settings.episode.model_copy(
        update={"alias_memory_ids": False})})
    result = await _run(plain, agent_memory, chat_tokenizer, episode_script, embed)
    tools = [t["content"] for t in result.transcript if t["role"] == "tool" and t["stage"] == 1]
    assert STORE_ID.search(tools[0]) and "M1" not in tools[0]
    assert "no memory with id" in tools[2]  # "M1" means nothing to the store


def test_aliases_replace_whole_ids_only_and_unknown_ids_pass_through() -> None:
    aliases = MemoryIdAliases()
    # an imported memory's short id must not be replaced inside words
    assert aliases.shown("- ab is in cab (Memory ID: ab)", ["ab"]) == "- ab is in cab (Memory ID: M1)"
    assert aliases.shown("Delete_memory: no memory with id 'ab' in this session", ["ab"]).endswith("id 'M1' in this session")
    assert aliases.call_arguments({"memory_id": " M1 "}) == {"memory_id": "ab"}
    assert aliases.call_arguments({"memory_id": "M7"}) == {"memory_id": "M7"}
    assert aliases.call_arguments({"memory_id": 3}) == {"memory_id": 3}
    assert aliases.call_arguments({"query": "x"}) == {"query": "x"}


async def test_two_runs_of_an_episode_show_the_model_the_same_text(agent_settings, agent_memory, chat_tokenizer,
                                                                    episode_script, embed) -> None:
    # Each run opens its own session (a new random store id for every memory); the prompts the policy
    # sees, and so a seeded rollout, must not depend on them.
    engine = EpisodeEngine.from_settings(_aliased(agent_settings), tokenizer=chat_tokenizer, memory=agent_memory,
                                         encode=embed)
    runs = [await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
            for _ in range(2)]
    assert runs[0].stats.memories_final[0]["memory_id"] != runs[1].stats.memories_final[0]["memory_id"]
    assert [s.prompt_ids for s in runs[0].segments] == [s.prompt_ids for s in runs[1].segments]
    assert [s.response_ids for s in runs[0].segments] == [s.response_ids for s in runs[1].segments]
