"""``agemem chat``: talk to the memory agent, with long-term memory in a named space.

Input: ``--message`` (repeatable: one turn each), else stdin when it is not a terminal (one turn
per non-empty line: a transcript), else an interactive prompt. Lines starting with ``/`` are
commands (``/help``). ``--json`` prints one JSON object per turn or command (JSONL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Annotated, Any, AsyncIterator, Callable, Optional

import typer

from agemem.agent import tools as T
from agemem.agent.conversation import Conversation
from agemem.agent.stats import ToolEvent
from agemem.chat import MemoryAgent
from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, settings_from_cli
from agemem.memory.spaces import backend_key
from agemem.settings import Settings

HELP = """commands:
  /memories [N]   the space's newest N memories (default 20)
  /search QUERY   search the space's long-term memory
  /forget ID      delete one memory by its id (as /memories or the agent's tool calls show it)
  /budget         the context budget: tokens used, messages, rewrites
  /help           this list
  /quit           leave (also Ctrl-D)"""


@command
def chat(
    model: Annotated[Optional[str], typer.Option(
        "--model", help="A checkpoint directory or registry URI (models:/agemem-policy@champion), or the endpoint's "
                        "model name with --policy openai|dashscope (default chat.model, else the newest checkpoint).")
    ] = None,
    policy: Annotated[Optional[str], typer.Option(
        "--policy", help="checkpoint | openai | dashscope | scripted (chat.policy; --base-url implies openai).")] = None,
    base_url: Annotated[Optional[str], typer.Option(
        "--base-url", help="OpenAI-compatible endpoint of the policy, e.g. http://127.0.0.1:8000/v1.")] = None,
    space: Annotated[Optional[str], typer.Option(
        "--space", help="Named memory space (chat.space, default 'default'); it persists across chats.")] = None,
    message: Annotated[Optional[list[str]], typer.Option(
        "--message", "-m", help="Say this and exit (repeatable: one turn each).")] = None,
    show_tools: Annotated[bool, typer.Option("--show-tools", help="Print each tool call and its result.")] = False,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Chat with the memory agent: the episode engine's prompt, tools and budget, memory in a named space."""
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)  # loading chatter would bury the conversation
    if base_url is not None and policy is None:
        policy = "openai"
    settings = settings_from_cli(profile, sets, **{"chat.policy": policy, "chat.model": model,
                                                   "chat.base_url": base_url, "chat.space": space})
    lines = _messages(message)
    asyncio.run(_session(settings, lines, show_tools=show_tools, as_json=as_json))


def _messages(given: list[str] | None) -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        if given:
            for text in given:
                yield text
            return
        interactive = sys.stdin.isatty()
        while True:
            line = await asyncio.to_thread(_read_line, "you> " if interactive else "")
            if line is None:
                return
            if line.strip():
                yield line.strip()

    return gen()


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt) if prompt else (sys.stdin.readline() or None)
    except EOFError:
        return None


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    typer.echo(json.dumps(payload, ensure_ascii=False, default=str) if as_json else text)


def _tool_printer(as_json: bool) -> Callable[[ToolEvent], None]:
    def show(event: ToolEvent) -> None:
        if as_json:
            return  # the turn's JSON carries its tool calls
        args = json.dumps(event.arguments, ensure_ascii=False)
        typer.echo(f"  [tool] {event.name} {args}")
        result = event.result.replace("\n", "\n           ")
        typer.echo(f"  [{event.outcome}] {result}")

    return show


async def _session(settings: Settings, lines: AsyncIterator[str], *, show_tools: bool, as_json: bool) -> None:
    agent = MemoryAgent.from_settings(settings)
    try:
        name = settings.chat.space
        convo = await agent.conversation(name, on_event=_tool_printer(as_json) if show_tools else None)
        if not as_json:
            typer.echo(f"policy: {agent.label}; memory space {name!r} on {backend_key(settings)} "
                       "(/help for commands)", err=True)
        async for line in lines:
            if line.startswith("/"):
                if not await _command(agent, convo, line, as_json):
                    return
                continue
            turn = await convo.say(line)
            reply = turn.reply or f"(no answer after {turn.rounds} rounds: {turn.end})"
            _emit(as_json, {"space": name, **turn.as_dict()}, f"agent> {reply}")
    finally:
        await agent.aclose()


async def _command(agent: MemoryAgent, convo: Conversation, line: str, as_json: bool) -> bool:
    """Run a slash command; False to leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    session = convo.session
    if name in ("/quit", "/exit"):
        return False
    if name == "/budget":
        budget = convo.budget()
        _emit(as_json, {"command": name, **budget},
              f"context: {budget['context_tokens']}/{budget['budget']} tokens ({budget['share']:.0%}), "
              f"{budget['messages']} messages, {budget['rewrites']} rewrites, {budget['overflows']} overflows")
    elif name == "/memories":
        items = await agent.memory.list_memories(session)
        keep = items[-int(arg):] if arg.isdigit() and int(arg) > 0 else items[-20:]
        _emit(as_json, {"command": name, "total": len(items), "memories": [m.model_dump() for m in keep]},
              "\n".join([f"{len(items)} memories" + (f" (newest {len(keep)})" if len(keep) < len(items) else "")]
                        + [f"  {m.memory_id}  [{m.memory_type}] {m.content}" for m in keep]))
    elif name in ("/search", "/forget"):
        if not arg:
            _emit(as_json, {"command": name, "error": "needs an argument"}, f"{name} needs an argument (/help)")
            return True
        # /forget takes a store id (/memories) or an id the model was shown (M1, ... in --show-tools)
        tool, args = ((T.RETRIEVE, {"query": arg, "top_k": 5}) if name == "/search"
                      else (T.DELETE, convo.state.memory_ids.call_arguments({"memory_id": arg})))
        result = await agent.memory.call_tool(session, tool, args)
        _emit(as_json, {"command": name, "ok": result.ok, "text": result.text, "data": result.data}, result.text)
    elif name == "/help":
        _emit(as_json, {"command": name, "help": HELP}, HELP)
    else:
        _emit(as_json, {"command": name, "error": "unknown command"}, f"unknown command {name} (/help)")
    return True
