"""The judge's prompts: answer quality and memory quality (the reward side owns them)."""

from __future__ import annotations

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


__all__ = ["ANSWER_JUDGE_PROMPT", "MEMORY_JUDGE_PROMPT"]
