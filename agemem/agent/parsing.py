"""Parse one model turn: ``<think>``, ``<tool_call>`` (object, array, or several objects) and ``<answer>``.

Accepted ``<tool_call>`` bodies: a single ``{"name", "arguments"}`` object (Qwen/hermes native
form), a JSON array of such objects (the reference's form), or several objects one after
another; ``arguments`` may be an object or a JSON string. Anything inside ``<think>`` is
reasoning and never executed. An empty ``<answer>`` is no answer. :func:`parse_response` never
raises: problems come back as :class:`FormatIssue` objects whose ``message`` is sent to the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agemem.agent.tools import ToolCall

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_TOOL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)
_MAX_SNIPPET = 80


@dataclass(frozen=True)
class FormatIssue:
    """A protocol violation in a model turn. ``kind`` is a stable counter key."""

    kind: str  # invalid_json | bad_call | unclosed_tool_call | unclosed_answer | unclosed_think | empty_answer
    message: str


@dataclass
class ParsedResponse:
    think: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    issues: list[FormatIssue] = field(default_factory=list)
    ignored_in_think: int = 0  # <tool_call> blocks written inside <think> (not executed)

    @property
    def has_action(self) -> bool:
        return bool(self.tool_calls) or self.answer is not None

    @property
    def errors(self) -> list[FormatIssue]:
        """Issues the model must hear about (unclosed answers are accepted silently)."""
        return [i for i in self.issues if i.kind != "unclosed_answer"]


def _find(text: str, tag: str) -> int:
    # Not str.lower().find: lower() can change the length of some Unicode strings.
    match = re.search(re.escape(tag), text, re.IGNORECASE)
    return match.start() if match else -1


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_SNIPPET else text[:_MAX_SNIPPET] + "..."


def _decode_values(body: str) -> tuple[list[Any], str | None]:
    """Decode one or more JSON values written back to back; returns (values, error message)."""
    body = body.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return [], "empty <tool_call> block"
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as exc:
            return values, f"invalid JSON in <tool_call> ({exc.msg} at character {exc.pos}): {_snippet(body)}"
        except RecursionError:
            return values, "invalid JSON in <tool_call> (nested too deeply)"
        values.append(value)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n,;":
            pos += 1
    return values, None


def _calls_from_value(value: Any, issues: list[FormatIssue]) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for item in items:
        if not isinstance(item, dict):
            issues.append(
                FormatIssue("bad_call", f'each tool call must be an object {{"name": ..., "arguments": {{...}}}}, '
                            f"got {type(item).__name__}: {_snippet(json.dumps(item, ensure_ascii=False, default=str))}")
            )
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            issues.append(FormatIssue("bad_call", 'tool call has no "name" string'))
            continue
        args = item.get("arguments", item.get("parameters", {}))
        calls.append(ToolCall(name=name.strip(), arguments=args, raw=_snippet(json.dumps(item, ensure_ascii=False,
                                                                                            default=str))))
    return calls


def _parse_block(body: str, issues: list[FormatIssue]) -> list[ToolCall]:
    values, error = _decode_values(body)
    calls: list[ToolCall] = []
    for value in values:
        calls.extend(_calls_from_value(value, issues))
    if error is not None:
        issues.append(FormatIssue("invalid_json", error))
    return calls


def parse_response(text: Any) -> ParsedResponse:
    """Split a model turn into thinking, tool calls and the answer. Never raises."""
    out = ParsedResponse()
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    thoughts = [m.group(1).strip() for m in _THINK.finditer(text)]
    visible = _THINK.sub(" ", text)
    open_think = _find(visible, "<think>")
    if open_think != -1:
        # An unclosed <think> (e.g. cut by max_tokens) runs to the end: nothing after it is an action.
        thoughts.append(visible[open_think + len("<think>"):].strip())
        visible = visible[:open_think]
        out.issues.append(FormatIssue("unclosed_think", "<think> was not closed; nothing after it was executed"))
    out.think = "\n".join(t for t in thoughts if t)
    out.ignored_in_think = sum(t.lower().count("<tool_call>") for t in thoughts)

    last_end = 0
    for match in _TOOL_BLOCK.finditer(visible):
        out.tool_calls.extend(_parse_block(match.group(1), out.issues))
        last_end = match.end()
    tail = visible[last_end:]
    open_call = _find(tail, "<tool_call>")
    if open_call != -1:
        # A truncated block: execute it only if what is there is complete JSON.
        body = tail[open_call + len("<tool_call>"):]
        answer_at = _find(body, "<answer>")
        if answer_at != -1:
            body = body[:answer_at]
        before = len(out.issues)
        calls = _parse_block(body, out.issues)
        if len(out.issues) > before or not calls:
            out.issues.append(FormatIssue("unclosed_tool_call", "<tool_call> was not closed with </tool_call>"))
        out.tool_calls.extend(calls)

    closed = [m.group(1).strip() for m in _ANSWER.finditer(visible)]
    if closed:
        out.answer = next((a for a in closed if a), "")
    else:
        opens = [m.start() for m in re.finditer(re.escape("<answer>"), visible, re.IGNORECASE)]
        if opens:
            out.answer = visible[opens[-1] + len("<answer>"):].strip()
            if out.answer:
                out.issues.append(FormatIssue("unclosed_answer", "<answer> was not closed"))
    if out.answer == "":
        # An empty answer answers nothing: it must not end the stage or count as answered (which
        # would spare it the reward's no-answer penalty), so the model hears it like any format error.
        out.answer = None
        out.issues.append(FormatIssue("empty_answer", "<answer> was empty: write the answer between "
                                                      "<answer> and </answer>"))
    return out


_TAGS = re.compile(r"</?(?:think|tool_call|answer)>", re.IGNORECASE)


def visible_text(text: str) -> str:
    """What a reader would take for the reply when a turn has no ``<answer>``: the text outside
    ``<think>`` and ``<tool_call>`` blocks, tags removed (an unclosed block runs to the end)."""
    text = _TOOL_BLOCK.sub(" ", _THINK.sub(" ", text or ""))
    for tag in ("<think>", "<tool_call>"):
        at = _find(text, tag)
        if at != -1:
            text = text[:at]
    return " ".join(_TAGS.sub(" ", text).split())


__all__ = ["FormatIssue", "ParsedResponse", "parse_response", "visible_text"]
