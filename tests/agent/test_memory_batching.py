"""Memory calls of one reply run concurrently, with the same results, order and statistics."""

from __future__ import annotations

import json

from agemem.agent import executor as executor_module
from agemem.agent.episode import EpisodeEngine
from agemem.agent.scripted import ScriptedTokenPolicy, default_responses
from agemem.memory import service as service_module

FACTS = [
    "Scott Derrickson is an American director born in 1966.",
    "Ed Wood was an American filmmaker known for low-budget films.",
    "Doctor Strange was directed by Scott Derrickson.",
    "Glen or Glenda is a 1953 film by Ed Wood.",
]


def _reply(calls: list[dict]) -> str:
    return f"<think>store</think>\n<tool_call>{json.dumps(calls)}</tool_call>"


def _add(text: str) -> dict:
    return {"name": "Add_memory", "arguments": {"content": text, "memory_type": "knowledge"}}


def _retrieve(query: str) -> dict:
    return {"name": "Retrieve_memory", "arguments": {"query": query, "top_k": 2}}


class BatchSpy:
    """Delegates to the real embedder and keeps how many texts each forward pass embedded."""

    def __init__(self, encode) -> None:
        self.encode_real, self.sizes = encode, []

    def __call__(self, texts):
        self.sizes.append(len(texts))
        return self.encode_real(texts)


def _view(result) -> dict:
    """Everything the episode reports but timings."""
    s = result.stats
    events = [(e.stage, e.round, e.name, e.outcome, e.arguments, e.result, e.data, e.context_tokens)
              for e in s.events]
    tools = [t["content"] for t in result.transcript if t["role"] == "tool"]
    return {"events": events, "tools": tools, "calls": s.tool_calls, "adds": s.memory_adds_ok,
            "memories": [m["content"] for m in s.memories_final], "answer": s.final_answer,
            "rounds": s.rounds, "tokens": (s.model_tokens, s.injected_tokens),
            "segments": [(seg.prompt_ids, seg.response_ids, seg.response_mask) for seg in result.segments]}


async def _run(settings, memory, tokenizer, script, embed, replies, monkeypatch):
    # Memory ids are random and their token counts differ; numbered ids make two runs comparable.
    counter = iter(range(1, 10**6))
    monkeypatch.setattr(service_module.secrets, "token_hex", lambda n=16: f"{next(counter):0{2 * n}x}")
    responses = default_responses(script)
    responses[(1, 0)] = replies
    engine = EpisodeEngine.from_settings(settings, tokenizer=tokenizer, memory=memory, encode=embed)
    return await engine.run_tokens(script, ScriptedTokenPolicy(tokenizer, script, responses), request_id="r")


async def test_adds_of_one_reply_are_batched_with_sequential_results(
        agent_settings, agent_memory, chat_tokenizer, episode_script, embed, monkeypatch) -> None:
    replies = [
        # Three adds run together; the retrieve after them must see them; the last add runs alone.
        _reply([_add(FACTS[0]), _add(FACTS[1]), _add(FACTS[2]), _retrieve("Who directed Doctor Strange?"),
                _add(FACTS[3])]),
        "<think>ok</think>\n<answer>Noted.</answer>",
    ]
    # The server's text cache would serve repeated texts (here and from other tests) without a forward pass.
    monkeypatch.setattr(agent_memory.service.embedder, "cache_size", 0)
    agent_memory.service.embedder._cache.clear()
    spy = BatchSpy(agent_memory.service.embedder.encode)
    monkeypatch.setattr(agent_memory.service.embedder, "encode", spy)
    batched = await _run(agent_settings, agent_memory, chat_tokenizer, episode_script, embed, replies, monkeypatch)
    batched_sizes, spy.sizes = list(spy.sizes), []

    monkeypatch.setattr(executor_module, "_BATCHABLE", frozenset())  # the sequential engine
    sequential = await _run(agent_settings, agent_memory, chat_tokenizer, episode_script, embed, replies, monkeypatch)

    assert 3 in batched_sizes, batched_sizes  # the three adds shared one forward pass
    assert max(spy.sizes) == 1  # sequentially, one text per forward pass
    assert _view(batched) == _view(sequential)

    # In call order, each add has its own id, and the retrieve saw the adds made before it.
    stage1 = [e for e in batched.stats.events if e.stage == 1]
    assert [e.name for e in stage1] == ["Add_memory"] * 3 + ["Retrieve_memory", "Add_memory"]
    assert [e.arguments["content"] for e in stage1 if e.name == "Add_memory"] == [FACTS[0], FACTS[1], FACTS[2],
                                                                                   FACTS[3]]
    ids = [e.data["memory_id"] for e in stage1 if e.name == "Add_memory"]
    assert len(set(ids)) == 4
    tool_msgs = [t["content"] for t in batched.transcript if t["role"] == "tool" and t["stage"] == 1]
    # the model reads the episode's aliases, in call order; the events' data keep the store's ids
    assert [m.split("Memory ID: ")[1].rstrip(")") for m in tool_msgs if "memory added" in m] == ["M1", "M2", "M3", "M4"]
    assert FACTS[2] in stage1[3].result and FACTS[3] not in stage1[3].result
    assert batched.stats.memory_adds_ok == 4
    assert [m["content"] for m in batched.stats.memories_final][:4] == FACTS


async def test_mixed_and_failing_calls_keep_their_order(
        agent_settings, agent_memory, chat_tokenizer, episode_script, embed, monkeypatch) -> None:
    replies = [
        _reply([_add(FACTS[0]), {"name": "Add_memory", "arguments": {"content": ""}}, _add(FACTS[1]),
                _retrieve("Ed Wood"), _retrieve("Scott Derrickson"),
                {"name": "Delete_memory", "arguments": {"memory_id": "f" * 32}}, _add(FACTS[2])]),
        "<think>ok</think>\n<answer>Noted.</answer>",
    ]
    batched = await _run(agent_settings, agent_memory, chat_tokenizer, episode_script, embed, replies, monkeypatch)
    monkeypatch.setattr(executor_module, "_BATCHABLE", frozenset())
    sequential = await _run(agent_settings, agent_memory, chat_tokenizer, episode_script, embed, replies, monkeypatch)
    assert _view(batched) == _view(sequential)
    stage1 = [(e.name, e.outcome) for e in batched.stats.events if e.stage == 1]
    assert stage1 == [("Add_memory", "ok"), ("Add_memory", "error"), ("Add_memory", "ok"),
                      ("Retrieve_memory", "ok"), ("Retrieve_memory", "ok"), ("Delete_memory", "error"),
                      ("Add_memory", "ok")]
