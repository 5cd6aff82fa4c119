"""Prompt texts: the policy's system prompt, the summary prompt and the judge prompts.

The system prompt describes the tools as JSON (the reference's text protocol) so that the same
prompt works for token-level policies (rendered by the tokenizer's chat template without the
template's own ``tools=`` block) and for any chat endpoint.
"""

from __future__ import annotations

import json
from typing import Any

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

ANSWER_JUDGE_PROMPT = """You grade a predicted answer against the expected answer to a question.
Question: {question}
Expected answer: {gold}
Predicted answer: {prediction}

Score from 0.0 to 1.0: 1.0 equivalent; 0.8-0.9 minor differences; 0.6-0.7 partially correct;
0.4-0.5 significant errors; 0.2-0.3 mostly wrong; 0.0-0.1 wrong or irrelevant.
Reply with the number only, e.g. 0.7"""

MEMORY_JUDGE_PROMPT = """You grade how well a set of stored memories covers the gold supporting facts of a question,
without irrelevant entries.
Gold supporting facts:
{gold}

Stored memories:
{memories}

Score from 0.0 (nothing relevant stored) to 1.0 (every gold fact stored, nothing irrelevant).
Reply with the number only, e.g. 0.7"""


def system_prompt(schemas: list[dict[str, Any]], budget: int) -> str:
    """The policy's system prompt for these tool schemas and context budget."""
    tools = "\n".join(json.dumps(s["function"], ensure_ascii=False) for s in schemas)
    names = {s["function"]["name"] for s in schemas}
    hints = "\n".join(text for name, text in _HINTS.items() if name in names)
    return SYSTEM_PROMPT_TEMPLATE.format(tools=tools, budget=budget, hints=hints)


__all__ = ["ANSWER_JUDGE_PROMPT", "MEMORY_JUDGE_PROMPT", "SUMMARY_PROMPT", "system_prompt"]
