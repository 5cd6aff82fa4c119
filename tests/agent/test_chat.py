"""``agemem chat``: conversations on the episode engine, long-term memory in named spaces.

Real milvus-lite files, the real embedding model, the tool server over real HTTP on loopback, and
the scripted conversation policy (or a tiny random transformers checkpoint) as the agent.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agemem.agent.conversation import Conversation
from agemem.chat import MemoryAgent
from agemem.cli import app
from agemem.memory.client import HttpMemoryClient
from agemem.memory.spaces import SpaceTokens, open_space, space_name, space_session_id
from agemem.settings import load_settings
from tests.fixtures_memory import running_server


def _chat(runs: Path, *args: str, input: str | None = None) -> str:
    res = CliRunner().invoke(app, ["chat", "--profile", "smoke", "--set", f"runs_dir={runs}", "--policy", "scripted",
                                   *args], input=input)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "ERROR" not in res.output
    return res.stdout


def _jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_second_chat_in_the_same_space_retrieves_what_the_first_stored(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = _chat(runs, "--space", "alice", "--show-tools", "-m", "Remember that my cat is called Tomasz")
    assert "[tool] Add_memory" in first and '"my cat is called Tomasz"' in first and "agent> Noted." in first
    spaces_file = runs / "memory-spaces.json"
    assert stat.S_IMODE(spaces_file.stat().st_mode) == 0o600  # it holds session tokens

    # A new chat (a new engine, a new context): only long-term memory can answer.
    second = _jsonl(_chat(runs, "--space", "alice", "--json", input="what is my cat called?\n/budget\n"))
    turn, budget = second
    assert turn["space"] == "alice" and turn["answered"] and "Tomasz" in turn["reply"]
    assert [c["name"] for c in turn["tool_calls"]] == ["Retrieve_memory"] and "Tomasz" in turn["tool_calls"][0]["result"]
    assert budget["command"] == "/budget" and 0 < budget["context_tokens"] == turn["context_tokens"] <= budget["budget"]

    # Another space does not see it.
    other = _jsonl(_chat(runs, "--space", "bob", "--json", "-m", "what is my cat called?"))[0]
    assert "Tomasz" not in other["reply"] and "Tomasz" not in other["tool_calls"][0]["result"]


def test_slash_commands_list_search_and_delete_memories(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _chat(runs, "-m", "my sister lives in Lisbon", "-m", "the train leaves at nine")
    out = _jsonl(_chat(runs, "--json", input="/memories\n/search sister\n/nonsense\n/search\n"))
    listed, found, unknown, empty = out
    assert listed["total"] == 2 and {m["content"] for m in listed["memories"]} == {"my sister lives in Lisbon",
                                                                                  "the train leaves at nine"}
    assert found["ok"] and "Lisbon" in found["text"].splitlines()[1]
    assert unknown["error"] == "unknown command" and empty["error"] == "needs an argument"
    sister = next(m["memory_id"] for m in listed["memories"] if "sister" in m["content"])
    gone = _jsonl(_chat(runs, "--json", input=f"/forget {sister}\n/memories\n/quit\nnot read\n"))
    assert gone[0]["ok"] and gone[1]["total"] == 1 and len(gone) == 2  # /quit ends before the last line
    text = _chat(runs, input="/memories 1\n")
    assert "1 memories" in text and "the train leaves at nine" in text


def test_forget_takes_the_id_the_agent_was_shown(tmp_path: Path) -> None:
    out = _jsonl(_chat(tmp_path / "runs", "--json",
                       input="Remember that my cat is called Tomasz\n/forget M1\n/memories\n"))
    turn, forgot, listed = out
    assert turn["tool_calls"][0]["result"].endswith("(Memory ID: M1)")
    assert forgot["ok"] and listed["total"] == 0


def test_spaces_persist_on_a_tool_server_and_are_never_swept(tmp_path: Path) -> None:
    """Over real HTTP: the space outlives its client; the idle sweeper keeps it; its token is needed."""
    settings = load_settings("smoke", {"runs_dir": str(tmp_path / "server"),
                                       "memory": {"uri": str(tmp_path / "server.db"), "server_token": "s3cret",
                                                  "session_idle_ttl_s": 1}})
    with running_server(settings) as (base_url, _server, service):
        client_settings = load_settings("smoke", {"runs_dir": str(tmp_path / "client"),
                                                  "memory": {"server_url": base_url, "server_token": "s3cret"},
                                                  "chat": {"policy": "scripted", "space": "team"}})

        async def chat(message: str) -> str:
            agent = MemoryAgent.from_settings(client_settings)
            try:
                convo = await agent.conversation()
                return (await convo.say(message)).reply
            finally:
                await agent.aclose()

        import asyncio

        assert asyncio.run(chat("the deploy key rotates on Fridays")) == "Noted."
        import time

        time.sleep(1.2)
        asyncio.run(service.sweep_idle())
        assert service.expired == 0  # the space is not a rollout session
        assert "Fridays" in asyncio.run(chat("when does the deploy key rotate?"))

        # Someone without the kept token cannot take the space over; the error says what to do.
        async def stranger() -> None:
            http = HttpMemoryClient(base_url, server_token="s3cret", timeout_s=30.0, retries=1)
            try:
                await open_space(http, SpaceTokens(tmp_path / "other.json", base_url), "team")
            finally:
                await http.aclose()

        with pytest.raises(LookupError, match="exists on .* holds no token for it"):
            asyncio.run(stranger())

        # A wrong server token is one error line, not a traceback.
        wrong = CliRunner().invoke(app, ["chat", "--policy", "scripted", "--set", f"runs_dir={tmp_path / 'wrong'}",
                                         "--set", f"memory.server_url={base_url}", "--set", "memory.server_token=nope",
                                         "--space", "elsewhere", "-m", "hi"])
        assert wrong.exit_code == 2 and "server token refused" in wrong.output and "Traceback" not in wrong.output


def test_space_names_and_ids() -> None:
    assert space_session_id("my_space-1") == "space-my_space-1" and space_name("space-my_space-1") == "my_space-1"
    assert space_name("0" * 32) is None
    from agemem.memory.arguments import ArgumentError

    for bad in ("", "a b", "x" * 59, "../etc"):
        with pytest.raises(ArgumentError):
            space_session_id(bad)
    bad = CliRunner().invoke(app, ["chat", "--policy", "scripted", "--space", "no spaces", "-m", "hi"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


async def test_conversation_keeps_the_context_across_messages(smoke_settings) -> None:
    settings = smoke_settings.model_copy(update={"chat": smoke_settings.chat.model_copy(update={"policy": "scripted"})})
    agent = MemoryAgent.from_settings(settings)
    try:
        convo = await agent.conversation("ctx")
        assert isinstance(convo, Conversation)
        first = await convo.say("I like green tea")
        second = await convo.say("I drive a blue car")
        assert first.answered and second.answered and second.context_tokens > first.context_tokens
        assert agent.engine.system_prompt == convo.state.ctx.messages()[0]["content"]  # the episode's prompt
        assert convo.budget()["turns"] == 2 and convo.budget()["tool_calls"] == 2
    finally:
        await agent.aclose()


def test_chat_with_a_checkpoint_directory_answers_through_the_token_server(tmp_path: Path) -> None:
    """A real (tiny, random) transformers checkpoint plays: the turn ends cleanly, whatever it says."""
    from agemem.train.models import materialise_tiny_model

    runs = tmp_path / "runs"
    sets = [f"runs_dir={runs}", "train.device=cpu", "train.tiny_hidden_size=32", "train.tiny_num_layers=1",
            "episode.max_turn_tokens=8", "chat.max_rounds=2"]
    model_dir = materialise_tiny_model(load_settings("smoke", {"runs_dir": str(runs)}), tmp_path / "tiny")
    res = CliRunner().invoke(app, ["chat", "--profile", "smoke", *[a for s in sets for a in ("--set", s)],
                                   "--model", str(model_dir), "--json", "-m", "hello there"])
    assert res.exit_code == 0, res.output
    turn = _jsonl(res.stdout)[0]
    assert turn["rounds"] == 2 and turn["end"] in ("round_limit", "answer", "threshold")


def test_a_missing_registry_alias_names_the_fix(tmp_path: Path) -> None:
    from agemem.tracking.runs import configure

    settings = load_settings("smoke", {"runs_dir": str(tmp_path / "runs")})
    client = configure(settings)
    client.create_registered_model("agemem-policy")
    version = client.create_model_version("agemem-policy", str(tmp_path), run_id=None)
    client.set_registered_model_alias("agemem-policy", "candidate", version.version)
    res = CliRunner().invoke(app, ["chat", "--profile", "smoke", "--set", f"runs_dir={tmp_path / 'runs'}",
                                   "--model", "models:/agemem-policy@champion", "-m", "hi"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "tracking.crown_random_weights=true" in res.output and "models:/agemem-policy@candidate" in res.output


async def test_a_long_conversation_drops_its_oldest_messages_instead_of_ending(smoke_settings) -> None:
    """Even under overflow_policy=end_stage: a conversation over budget keeps answering."""
    settings = smoke_settings.model_copy(update={
        "chat": smoke_settings.chat.model_copy(update={"policy": "scripted"}),
        "episode": smoke_settings.episode.model_copy(update={"overflow_policy": "end_stage"}),
    })
    agent = MemoryAgent.from_settings(settings)
    try:
        convo = await agent.conversation("long")
        budget = convo.budget()["budget"]
        system = convo.budget()["context_tokens"]
        filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
        turns = [await convo.say(f"note {i}: {filler}") for i in range(2 * (budget - system) // 300 + 2)]
        assert convo.budget()["overflows"] >= 1  # the budget was hit ...
        assert all(t.answered for t in turns)  # ... and every message still got its answer
        assert turns[-1].context_tokens <= budget
    finally:
        await agent.aclose()
