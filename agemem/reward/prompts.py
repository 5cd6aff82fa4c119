"""The judge's prompts: answer quality, memory quality, and the paper's R_storage / R_relevance graders."""

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

STORAGE_JUDGE_PROMPT = """An assistant stored the numbered memories below while reading a conversation; later it was
asked the question. A memory is high quality when it holds information useful for answering the question
(the expected answer and its supporting facts are given) and does not merely repeat another memory.
Question: {question}
Expected answer: {answer}
Supporting facts:
{facts}

Stored memories:
{memories}

How many of the {count} stored memories are high quality? Reply with one integer from 0 to {count}, e.g. 2"""

RELEVANCE_JUDGE_PROMPT = """An assistant retrieved the memories below from its long-term memory to answer the question.
Question: {question}
Expected answer: {answer}
Supporting facts:
{facts}

Retrieved memories:
{memories}

Score from 0.0 to 1.0 how relevant the retrieved memories are, overall, to answering the question:
1.0 they hold what the answer needs; 0.5 partly; 0.0 nothing relevant.
Reply with the number only, e.g. 0.7"""


__all__ = ["ANSWER_JUDGE_PROMPT", "MEMORY_JUDGE_PROMPT", "RELEVANCE_JUDGE_PROMPT", "STORAGE_JUDGE_PROMPT"]
