"""Full episodes with scripted policies, the real tokenizer, embedder and milvus-lite memory."""

from __future__ import annotations

import json
from itertools import groupby

import pytest


from agemem.agent.context import ChatTokenizer
from agemem.agent.episode import EpisodeEngine
from agemem.agent.scripted import ScriptedChatPolicy, ScriptedTokenPolicy, default_responses
from agemem.agent.tools import TOOL_NAMES
from agemem.reward.score import compute_score
from agemem.settings import load_settings


class RecordingPolicy(ScriptedTokenPolicy):
    """The scripted policy, also keeping every prompt it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompts: list[list[int]] = []
        self.params: list[dict] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.prompts.append(list(prompt_ids))
        self.params.append(dict(sampling_params))
        return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)


def _runs(seg):
    pos = 0
    for mask, group in groupby(seg.response_mask):
        n = len(list(group))
        yield mask, pos, seg.response_ids[pos:pos + n]
        pos += n


async def test_three_stage_episode_segments_masks_and_stats(agent_settings, agent_memory, chat_tokenizer,
                                                            episode_script, embed) -> None:
    engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    policy = RecordingPolicy(chat_tokenizer, episode_script)
    result = await engine.run_tokens(episode_script, policy, request_id="req-1")
    stats = result.stats

    # Stage 1 stored all ten paragraphs; the event log keeps that after the stage-2 reset.
    assert stats.memory_adds_ok == 10 and stats.tool_ok_counts["Add_memory"] == 10
    assert {m["stage"] for m in stats.memories_final} == {"1"} and len(stats.memories_final) == 10
    assert stats.storage_recall == 1.0 and stats.retrieval_recall == 1.0
    assert stats.tool_ok_counts["Filter_context"] == 1 and stats.preventive_context_tools == 1
    assert stats.answered and stats.final_answer and stats.stage3_rounds == 2
    assert stats.stage_end == {"1": "answer", "2": "answer", "3": "answer"}
    assert stats.rounds == {"1": 3, "2": 3, "3": 2} and stats.total_rounds == 8
    assert stats.format_error_count == 0 and stats.tool_error_count == 0 and stats.overflow_count == 0
    assert stats.judge_source == "offline" and stats.memory_quality is not None

    # Sampling: temperature from settings is actually sent, max_tokens caps a turn; one request id.
    assert all(p["temperature"] == 0.6 and p["max_tokens"] == 1024 for p in policy.params)
    assert set(policy.requests) == {"req-1"}

    # Segments: a new one at the stage reset and after the filter rewrite.
    assert [s.reason for s in result.segments] == ["start", "stage_reset", "filter"]
    model_turns = [t["content"] for t in result.transcript if t["role"] == "assistant"]
    decoded_model, prompts_seen = [], 0
    for seg in result.segments:
        assert len(seg.response_ids) == len(seg.response_mask)
        for mask, start, ids in _runs(seg):
            text = chat_tokenizer.decode(ids, skip_special_tokens=False)
            if mask == 1:
                assert ids[-1] == chat_tokenizer.eos_id
                decoded_model.append(chat_tokenizer.decode(ids, skip_special_tokens=True))
                # The prompt of this generate call was the segment prompt plus the response so far.
                assert policy.prompts[prompts_seen] == seg.prompt_ids + seg.response_ids[:start]
                prompts_seen += 1
            else:
                assert "<|im_start|>" in text and "<think>" not in text  # injected turns only
    assert decoded_model == model_turns
    assert prompts_seen == len(policy.prompts) == stats.total_rounds
    assert sum(s.num_model_tokens for s in result.segments) == sum(stats.model_tokens.values())

    # extra_fields is JSON and is everything compute_score needs.
    extra = json.loads(json.dumps(result.extra_fields()))
    score = compute_score("hotpotqa", result.transcript_text(), episode_script.gold_answer, extra)
    assert score["stats_missing"] == 0.0 and score["answered"] == 1.0
    assert score["r_preventive"] == 1.0
    # R_storage is the share of stored memories that hold a gold fact: the scripted agent stores all ten
    # stage-1 messages and two of them hold the supporting facts, so storing everything does not max it.
    assert stats.storage_quality_source == "offline" and score["r_storage"] == pytest.approx(0.2)
    assert stats.retrieval_relevance_source == "offline" and 0.0 < score["r_relevance"] <= 1.0


async def test_chat_policy_runs_the_same_episode(agent_settings, agent_memory, chat_tokenizer, episode_script,
                                                 embed) -> None:
    engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    tokens = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
    chat = await engine.run_chat(episode_script, ScriptedChatPolicy(episode_script))
    assert chat.segments == []
    assert chat.stats.final_answer == tokens.stats.final_answer
    assert chat.stats.tool_ok_counts == tokens.stats.tool_ok_counts


async def test_tool_errors_reach_the_model_and_are_counted(agent_settings, agent_memory, chat_tokenizer,
                                                           episode_script, embed) -> None:
    bad = [
        '<tool_call>{"name": "Update_memory", "arguments": {"memory_id": "nope", "content": "x"}}</tool_call>',
        '<tool_call>[{"name": "Delete_memory", "arguments": {"memory_id": "nope"}}, '
        '{"name": "Add_memory", "arguments": {"content": ""}}, {"name": "Launch (201 film): x", "arguments": {}}]</tool_call>',
        '<tool_call>{"name": "Retrieve_memory", "arguments": {"query": "x", "top_k": 99}}</tool_call>',
        '<tool_call>{"name": "Summary_context", "arguments": {"span": "ten"}}</tool_call><answer>ok</answer>',
    ]
    responses = default_responses(episode_script)
    responses[(1, 0)] = bad
    responses[(2, 0)] = ['<tool_call>{"name": "Add_memory", "arguments": {content: oops}}</tool_call>',
                         "plain text, no tags", "<answer>fine</answer>"]
    engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script, responses))
    s = result.stats
    assert s.tool_calls["Update_memory"] == {"error": 1}
    assert s.tool_calls["Delete_memory"] == {"error": 1}
    assert s.tool_calls["Add_memory"] == {"error": 1}
    # a made-up name is counted as "unknown" (counters become metric names) and kept as written in the log
    assert s.tool_calls["unknown"] == {"error": 1} and set(s.tool_calls) <= {*TOOL_NAMES, "unknown"}
    assert any(e.name == "Launch (201 film): x" for e in s.events)
    assert s.tool_calls["Retrieve_memory"] == {"error": 1, "ok": 1}
    assert s.tool_calls["Summary_context"] == {"error": 1}
    assert s.format_errors == {"invalid_json": 1, "no_action": 1}
    tool_texts = [t["content"] for t in result.transcript if t["role"] == "tool"]
    for fragment in ("no memory with id", "must not be empty", "unknown tool 'Launch (201 film): x'", "between 1 and 20",
                     "span must be", "invalid JSON"):
        assert any(fragment in t for t in tool_texts), fragment
    assert s.stage_end["1"] == "answer" and s.answered  # the episode carried on


async def test_an_empty_answer_is_a_format_error_not_an_answer(agent_settings, agent_memory, chat_tokenizer,
                                                               episode_script, embed) -> None:
    engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    responses = default_responses(episode_script)
    responses[(3, 0)] = ["<answer></answer>", "<answer>fine</answer>"]
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script, responses))
    assert result.stats.format_errors == {"empty_answer": 1}
    assert result.stats.answered and result.stats.final_answer == "fine"  # the model heard it and answered
    assert any("<answer> was empty" in t["content"] for t in result.transcript if t["role"] == "tool")

    # Only empty answers: the question is unanswered, and the reward's no-answer penalty applies.
    responses[(3, 0)] = ["<think>Done.</think><answer> </answer>"]
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script, responses))
    assert not result.stats.answered and result.stats.stage_end["3"] != "answer"
    score = compute_score("hotpotqa", result.transcript_text(), episode_script.gold_answer,
                          json.loads(json.dumps(result.extra_fields())))
    assert score["answered"] == 0.0
    assert score["penalty_no_answer"] < 0


async def test_summary_rewrites_context_and_opens_a_segment(agent_settings, agent_memory, chat_tokenizer,
                                                            episode_script, embed) -> None:
    responses = default_responses(episode_script)
    responses[(2, 1)] = ['<tool_call>{"name": "Summary_context", "arguments": {"span": "all"}}</tool_call>',
                         "<answer>nice</answer>"]
    engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script, responses))
    assert "summary" in [s.reason for s in result.segments]
    event = next(e for e in result.stats.events if e.name == "Summary_context")
    assert event.ok and event.data["replaced"] == 2 and event.data["source"] == "extractive"
    summary_seg = next(s for s in result.segments if s.reason == "summary")
    prompt = chat_tokenizer.decode(summary_seg.prompt_ids, skip_special_tokens=False)
    assert "[summary of 2 messages]" in prompt
    assert episode_script.distractors[1].text in prompt  # the current stage message survived


async def test_overflow_truncates_and_is_recorded(runs_dir, agent_memory, chat_tokenizer, episode_script,
                                                  embed) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "episode": {
        "max_turn_tokens": 1024, "max_context_tokens": 2048, "stage1_max_rounds": 4}})
    engine = EpisodeEngine.from_settings(settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
    s = result.stats
    assert s.overflow_count >= 1 and s.overflow_events[0].action == "truncate"
    assert "overflow" in [seg.reason for seg in result.segments]
    for seg in result.segments:  # every prompt the model saw fitted the budget
        assert len(seg.prompt_ids) <= 2048

    ended = load_settings("smoke", {"runs_dir": str(runs_dir), "episode": {
        "max_turn_tokens": 1024, "max_context_tokens": 2048, "overflow_policy": "end_stage"}})
    engine = EpisodeEngine.from_settings(ended, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
    assert result.stats.stage_end["1"] == "overflow" and not result.stats.overflow_events[0].fits


async def test_no_context_tools_ablation_auto_retrieves(agent_settings, agent_memory, chat_tokenizer,
                                                        episode_script, embed) -> None:
    settings = agent_settings.model_copy(update={"episode": agent_settings.episode.model_copy(
        update={"use_context_tools": False})})
    engine = EpisodeEngine.from_settings(settings, tokenizer=chat_tokenizer, memory=agent_memory, encode=embed)
    assert "Filter_context" not in engine.system_prompt and "Add_memory" in engine.system_prompt
    result = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
    s = result.stats
    assert s.tool_calls["Filter_context"] == {"disabled": 1}
    assert s.tool_calls["Retrieve_memory"] == {"disabled": 1}
    auto = [e for e in s.events if e.data.get("auto")]
    assert len(auto) == 1 + len(episode_script.distractors) + 1
    assert any(t["kind"] == "auto_retrieve" and "Scott Derrickson" in t["content"] for t in result.transcript
               if t["stage"] == 3)
    assert s.answered and s.retrieval_recall == 1.0


def test_tokenizer_is_cached(agent_settings) -> None:
    assert ChatTokenizer.from_path(agent_settings.episode.tokenizer) is ChatTokenizer.from_path(
        agent_settings.episode.tokenizer)
