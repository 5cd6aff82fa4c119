"""Deterministic scripted policies (tests, the offline ``agemem episode``, ``eval.policy=scripted``).

A scripted policy replays responses keyed by (stage, turn) and round. It works out where it is
from what it is shown, exactly like a real model: the latest injected stage message (facts,
distractor or question) found in the prompt, and the number of assistant turns since. A response
is a string or a function of the visible prompt text (for answers that depend on retrievals).

The default script behaves like a sensible agent: stage 1 stores each fact line with
``Add_memory``; stage 2 filters the previous distractor with ``Filter_context`` and replies;
stage 3 retrieves with the question and answers with the best-overlapping retrieved sentence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

from agemem.agent.context import ChatTokenizer
from agemem.agent.policy import GenerationOutput
from agemem.data.records import EpisodeScript
from agemem.reward.metrics import normalize_answer

Response = Union[str, Callable[[str], str]]
Key = tuple[int, int]  # (stage, turn within the stage)

_STOP = {"what", "which", "who", "when", "where", "how", "was", "were", "is", "are", "the", "a", "an", "of", "in",
         "and", "or", "did", "does", "do", "to", "for", "on", "by", "with", "that", "this", "same"}
_RETRIEVED = re.compile(r"\[retrieved memories\](.*?)(?=<\|im_end\|>|\[retrieved memories\]|$)", re.DOTALL)


def stage_messages(script: EpisodeScript) -> dict[str, Key]:
    """Injected message text -> (stage, turn)."""
    out: dict[str, Key] = {}
    for i, text in enumerate(script.stage1_turns):
        out[text] = (1, i)
    for i, d in enumerate(script.distractors):
        if d.text.strip():
            out[d.text] = (2, i)
    out[script.question] = (3, 0)
    return out


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def _tool_reply(thought: str, calls: list[dict[str, Any]]) -> str:
    body = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    return f"<think>{thought}</think>\n<tool_call>{body}</tool_call>"


def fact_lines(text: str, max_sentences: int = 2) -> list[str]:
    """The fact lines of a stage-1 message (``Title: sentences``) without the opener line, each cut
    to its first ``max_sentences`` sentences so one reply of Add_memory calls stays short."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    facts = [ln for ln in lines if len(ln.split()) >= 5 and not ln.endswith(":")]
    return [" ".join(re.split(r"(?<=[.!?])\s+", ln)[:max_sentences]) for ln in facts]


def best_retrieved_sentence(prompt_text: str, question: str) -> str | None:
    """The retrieved sentence that shares the most content words with the question."""
    blocks = _RETRIEVED.findall(prompt_text)
    if not blocks:
        return None
    q_words = {w for w in normalize_answer(question).split() if w not in _STOP}
    best, best_score = None, -1.0
    for block in blocks[-1:]:
        for line in block.splitlines():
            line = re.sub(r"\(\s*(?:memory\s*)?id[^)]*\)\s*$", "", line.strip(" -"), flags=re.IGNORECASE).strip()
            line = re.sub(r"^[^:]{1,80}:\s+", "", line)  # drop the 'Title: ' prefix of stored facts
            for sentence in re.split(r"(?<=[.!?])\s+", line):
                words = set(normalize_answer(sentence).split())
                if not words:
                    continue
                score = len(words & q_words) / (1 + 0.01 * len(words))
                if score > best_score:
                    best, best_score = sentence.strip(), score
    return best


@dataclass(frozen=True)
class ScriptStyle:
    """How the sensible agent writes: the default fits the paper's turns; :data:`COMPACT` fits short
    turns (a small model's warm start under a tight ``episode.max_turn_tokens``)."""

    facts_per_reply: int = 5
    fact_sentences: int = 2
    fact_chars: int | None = None  # cut each stored fact to this many characters (at a word)
    criteria_words: int | None = None  # Filter_context criteria: the first N words of the previous distractor
    answer_words: int | None = None  # cut the stage-3 answer to N words
    query_words: int | None = None  # Retrieve_memory query: the question's first N content words
    memory_type: str | None = "knowledge"  # Add_memory's optional memory_type (None: left out)
    terse: bool = False  # one-word thoughts


# A 25-word question copied as the query makes the stage-3 reply ~52 tokens (up to 101, over the smoke
# turn budget of 64) and is what a small model fails to copy; six content words keep it ~30. The
# optional memory_type is left out: the tiny warm-started model's commonest error was dropping its key.
COMPACT = ScriptStyle(facts_per_reply=1, fact_sentences=1, fact_chars=40, criteria_words=4, answer_words=6,
                      query_words=6, memory_type=None, terse=True)


def content_words(text: str, limit: int) -> str:
    """The first ``limit`` words of ``text`` that are not question or function words."""
    kept = [w for w in text.split() if normalize_answer(w) and normalize_answer(w) not in _STOP]
    return " ".join(w.strip("?!.,;:") for w in kept[:limit])


def _cut(text: str, chars: int | None = None, words: int | None = None) -> str:
    if words is not None:
        text = " ".join(text.split()[:words])
    if chars is not None and len(text) > chars:
        text = text[:chars].rsplit(" ", 1)[0]
    return text


def default_responses(script: EpisodeScript, style: ScriptStyle = ScriptStyle()) -> dict[Key, list[Response]]:
    """The sensible-agent script for one episode, written in ``style``."""
    think = (lambda long, short: short) if style.terse else (lambda long, short: long)
    out: dict[Key, list[Response]] = {}
    for i, text in enumerate(script.stage1_turns):
        facts = [_cut(f, style.fact_chars) for f in fact_lines(text, style.fact_sentences)] or [text[:2000]]
        typed = {"memory_type": style.memory_type} if style.memory_type else {}
        calls = [_call("Add_memory", content=f, **typed) for f in facts]
        n = style.facts_per_reply  # a few calls per reply keep it short and under the per-reply call limit
        replies: list[Response] = [
            _tool_reply(think("These facts may matter later; store them in long-term memory.", "Store."),
                        calls[k : k + n])
            for k in range(0, len(calls), n)
        ]
        out[(1, i)] = replies + [f"<think>{think('Stored.', 'Done.')}</think>\n<answer>Thanks, noted.</answer>"]
    distractors = [d.text for d in script.distractors if d.text.strip()]
    for i, text in enumerate(distractors):
        reply = f"<think>{think('Small talk unrelated to my stored facts.', 'Chat.')}</think>\n<answer>Sounds nice!</answer>"
        if i == 0:
            out[(2, i)] = [reply]
        else:
            criteria = _cut(distractors[i - 1], words=style.criteria_words)
            out[(2, i)] = [
                _tool_reply(think("The previous small talk is irrelevant now; drop it.", "Drop."),
                            [_call("Filter_context", criteria=criteria)]),
                reply,
            ]
    question = script.question
    query = content_words(question, style.query_words) if style.query_words else question

    def answer(prompt_text: str) -> str:
        sentence = _cut(best_retrieved_sentence(prompt_text, question) or "I do not know", words=style.answer_words)
        return f"<think>{think('The best matching memory answers it.', 'Answer.')}</think>\n<answer>{sentence}</answer>"

    out[(3, 0)] = [
        _tool_reply(think("Look up what I stored about this.", "Recall."),
                    [_call("Retrieve_memory", query=query or question, top_k=3)]),
        answer,
    ]
    return out


class _Replayer:
    def __init__(self, script: EpisodeScript, responses: Mapping[Key, Sequence[Response]] | None) -> None:
        self.script = script
        self.lookup = stage_messages(script)
        self.responses = dict(responses) if responses is not None else default_responses(script)
        self.calls = 0

    def locate(self, text: str, assistant_header: str, user_prefix: str = "") -> tuple[Key, int]:
        # Match only at the start of a user turn: the question also appears in tool-call arguments.
        best: tuple[int, int, Key] | None = None
        for message, key in self.lookup.items():
            pos = text.rfind(user_prefix + message)
            if pos >= 0:
                pos += len(user_prefix)
            if pos >= 0 and (best is None or (pos, len(message)) > (best[0], best[1])):
                best = (pos, len(message), key)
        if best is None:
            return (0, 0), 0
        after = text[best[0] + best[1]:]
        return best[2], max(0, after.count(assistant_header) - 1)

    def respond(self, key: Key, round_idx: int, visible: str) -> str:
        self.calls += 1
        options = self.responses.get(key) or ["<think>Nothing to do.</think>\n<answer>OK.</answer>"]
        response = options[min(round_idx, len(options) - 1)]
        return response(visible) if callable(response) else response


class ScriptedTokenPolicy:
    """Token-level scripted policy with verl's ``generate`` shape."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        script: EpisodeScript,
        responses: Mapping[Key, Sequence[Response]] | None = None,
        *,
        respect_max_tokens: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.replayer = _Replayer(script, responses)
        self.respect_max_tokens = respect_max_tokens
        base = [{"role": "system", "content": "s"}]
        head = tokenizer.render(base, add_generation_prompt=False)
        self._header = tokenizer.render(base, add_generation_prompt=True)[len(head):]
        probe = "\u2063PROBE\u2063"
        user = tokenizer.render(base + [{"role": "user", "content": probe}], add_generation_prompt=False)
        self._user_prefix = user[len(head):].split(probe, 1)[0] if user.startswith(head) else ""
        self.requests: list[str] = []

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> GenerationOutput:
        self.requests.append(request_id)
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        key, round_idx = self.replayer.locate(text, self._header, self._user_prefix)
        reply = self.replayer.respond(key, round_idx, text)
        ids = self.tokenizer.encode(reply)
        if self.tokenizer.eos_id is not None:
            ids.append(self.tokenizer.eos_id)
        stop = "stop"
        limit = int(sampling_params.get("max_tokens") or 0)
        if self.respect_max_tokens and limit and len(ids) > limit:
            ids, stop = ids[:limit], "length"
        return GenerationOutput(token_ids=ids, stop_reason=stop)


class ScriptedChatPolicy:
    """Chat-level scripted policy (messages in, text out)."""

    def __init__(self, script: EpisodeScript, responses: Mapping[Key, Sequence[Response]] | None = None) -> None:
        self.replayer = _Replayer(script, responses)

    async def chat(self, messages: Sequence[dict[str, str]], sampling_params: dict[str, Any]) -> str:
        stage_idx, key = -1, (0, 0)
        for i, m in enumerate(messages):
            if m.get("role") == "user" and m.get("content") in self.replayer.lookup:
                stage_idx, key = i, self.replayer.lookup[m["content"]]
        rounds = sum(1 for m in messages[stage_idx + 1:] if m.get("role") == "assistant") if stage_idx >= 0 else 0
        visible = "\n".join(m.get("content", "") for m in messages)
        return self.replayer.respond(key, rounds, visible)


class ScriptedConversationPolicy:
    """A deterministic chat agent for conversations (``agemem chat --policy scripted``, tests).

    For the latest user message: a question (ending in ``?``) is looked up with Retrieve_memory and
    answered with the best-matching retrieved sentence; anything else is stored with Add_memory
    (a leading "remember (that)" dropped) and acknowledged. Retrieval is therefore what the
    memory store returns, not what the context holds.
    """

    async def chat(self, messages: Sequence[dict[str, str]], sampling_params: dict[str, Any]) -> str:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        if last < 0:
            return "<think>Nothing asked.</think>\n<answer>Hello!</answer>"
        message = messages[last].get("content", "").strip()
        after = messages[last + 1:]
        if message.endswith("?"):
            if not any(m.get("role") == "assistant" for m in after):
                return _tool_reply("Look it up in long-term memory.", [_call("Retrieve_memory", query=message, top_k=3)])
            found = best_retrieved_sentence("\n".join(m.get("content", "") for m in after), message)
            return f"<think>The best matching memory answers it.</think>\n<answer>{found or 'I do not know.'}</answer>"
        if not any(m.get("role") == "assistant" for m in after):
            fact = re.sub(r"^(please\s+)?remember(\s+that)?[:,]?\s*", "", message, flags=re.IGNORECASE) or message
            return _tool_reply("Worth keeping.", [_call("Add_memory", content=fact[:2000], memory_type="user_info")])
        return "<think>Stored.</think>\n<answer>Noted.</answer>"


__all__ = [
    "COMPACT",
    "ScriptStyle",
    "ScriptedChatPolicy",
    "ScriptedConversationPolicy",
    "ScriptedTokenPolicy",
    "best_retrieved_sentence",
    "default_responses",
    "fact_lines",
    "stage_messages",
]
