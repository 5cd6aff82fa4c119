"""Prompt texts of the policy side: the system prompt and the Summary_context prompt.

The system prompt describes the tools as JSON (the reference's text protocol) so that the same
prompt works for token-level policies (rendered by the tokenizer's chat template without the
template's own ``tools=`` block) and for any chat endpoint.
"""

from __future__ import annotations

import json
from typing import Any

from agemem.agent.tools import tool_schemas

SYSTEM_PROMPT_TEMPLATE = """You are an assistant with a long-term memory and a short conversation context.
Long-term memory survives when the conversation is cleared; the context is limited to {budget} tokens.

Tools (JSON schemas):
{tools}

Protocol, for every reply:
1. Start with <think>...</think> (short reasoning; nothing inside it is executed).
2. Then write exactly one of:
   <tool_call>{{"name": "<tool>", "arguments": {{...}}}}</tool_call>
   (several calls: a JSON array of such objects inside one <tool_call>), or
   <answer>your reply or final answer</answer>
3. Write nothing outside these tags. Tool results come back in the next message.

{hints}
Final answers to questions are short (a name, a date, yes/no, a short phrase)."""

_HINTS = {
    "Add_memory": "Use Add_memory for facts worth keeping.",
    "Retrieve_memory": "Use Retrieve_memory before answering questions about earlier information.",
    "Summary_context": "Use Summary_context or Filter_context to keep the context small and relevant.",
}

SUMMARY_PROMPT = """Summarise the conversation excerpt below so it can replace the original messages.
Keep every fact, name, number, user intent, decision and open issue; drop greetings and filler.
Reply with the summary only.

Excerpt:
{excerpt}"""

def system_prompt(schemas: list[dict[str, Any]], budget: int) -> str:
    """The policy's system prompt for these tool schemas and context budget."""
    tools = "\n".join(json.dumps(s["function"], ensure_ascii=False) for s in schemas)
    names = {s["function"]["name"] for s in schemas}
    hints = "\n".join(text for name, text in _HINTS.items() if name in names)
    return SYSTEM_PROMPT_TEMPLATE.format(tools=tools, budget=budget, hints=hints)


def episode_system_prompt(episode: Any) -> str:
    """The system prompt of an episode under ``EpisodeSettings``: its tools and its context budget."""
    return system_prompt(tool_schemas(episode.use_context_tools), episode.max_context_tokens)


__all__ = ["SUMMARY_PROMPT", "episode_system_prompt", "system_prompt"]
