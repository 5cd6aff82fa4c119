"""Faults around the tool server (issue 7 §2): killed mid-episode, then restarted."""

from __future__ import annotations

import asyncio
import signal

import pytest

from agemem.agent.episode import EpisodeEngine
from agemem.agent.scripted import ScriptedTokenPolicy, default_responses
from agemem.memory.client import HttpMemoryClient
from tests.fixtures_memory import start_server_process, stop_server_process


@pytest.mark.slow
async def test_server_killed_mid_episode_then_restarted(tmp_path, agent_settings, chat_tokenizer, episode_script,
                                                        embed) -> None:
    db = tmp_path / "memory.db"
    proc, base_url = await asyncio.to_thread(start_server_process, db)
    port = int(base_url.rsplit(":", 1)[1])
    client = HttpMemoryClient(base_url, timeout_s=30.0, retries=1, backoff_s=0.05)
    try:
        engine = EpisodeEngine.from_settings(agent_settings, tokenizer=chat_tokenizer, memory=client, encode=embed)
        session = await client.create_session()  # ours, so the engine does not delete it
        responses = default_responses(episode_script)
        first_batch, second_batch, *rest = responses[(1, 0)]
        assert first_batch.count('"Add_memory"') == 5 and second_batch.count('"Add_memory"') == 5

        def kill_then_reply(_: str) -> str:
            # The crash happens between the model's two batches of Add_memory calls.
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return second_batch

        responses[(1, 0)] = [first_batch, kill_then_reply, *rest]
        crashed = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script, responses),
                                          session=session)
        s = crashed.stats
        assert proc.returncode == -signal.SIGKILL
        # The episode ran to its end and the model was told, call by call.
        assert s.memory_adds_ok == 5 and s.tool_calls["Add_memory"] == {"ok": 5, "unavailable": 5}
        assert s.memory_unavailable == 6  # 5 adds + the stage-3 retrieve
        assert s.stage_end == {"1": "answer", "2": "answer", "3": "answer"} and s.answered
        tool_texts = [t["content"] for t in crashed.transcript if t["role"] == "tool"]
        assert sum("memory service is unavailable" in t for t in tool_texts) == 6

        # Restart on the same file and port: the engine's client reconnects by itself.
        proc, _ = await asyncio.to_thread(start_server_process, db, port=port)
        kept = await client.list_memories(session)
        stored_before_crash = [e.arguments["content"] for e in s.events if e.name == "Add_memory" and e.ok]
        # One reply's adds run concurrently, so their creation times need not follow call order.
        assert sorted(m.content for m in kept) == sorted(stored_before_crash) and len(kept) == 5
        got = await client.call_tool(session, "Retrieve_memory", {"query": stored_before_crash[0], "top_k": 1})
        assert got.ok and got.data["memories"][0]["content"] == stored_before_crash[0]

        for _ in range(2):  # the next episodes are whole again
            after = await engine.run_tokens(episode_script, ScriptedTokenPolicy(chat_tokenizer, episode_script))
            assert after.stats.memory_unavailable == 0 and after.stats.tool_error_count == 0
            assert after.stats.memory_adds_ok == 10 and after.stats.retrieval_recall == 1.0
    finally:
        await client.aclose()
        await asyncio.to_thread(stop_server_process, proc)
