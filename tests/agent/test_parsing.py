"""The tool-call parser: every accepted form, errors, and property tests (never raises)."""

from __future__ import annotations

import json

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agemem.agent.parsing import parse_response
from agemem.agent.tools import ToolCall, validate_call

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def test_single_object_hermes_form() -> None:
    p = parse_response('<think>store it</think>\n<tool_call>\n{"name": "Add_memory", "arguments": '
                       '{"content": "Paris is in France"}}\n</tool_call>')
    assert p.think == "store it"
    assert [(c.name, c.arguments) for c in p.tool_calls] == [("Add_memory", {"content": "Paris is in France"})]
    assert p.answer is None and p.issues == []


def test_array_form_and_answer() -> None:
    body = json.dumps([{"name": "Retrieve_memory", "arguments": {"query": "x"}}, {"name": "Add_memory",
                                                                                   "arguments": {"content": "y"}}])
    p = parse_response(f"<think>t</think><tool_call>{body}</tool_call><answer> Paris </answer>")
    assert [c.name for c in p.tool_calls] == ["Retrieve_memory", "Add_memory"]
    assert p.answer == "Paris"


def test_arguments_as_json_string_accepted_and_validated() -> None:
    p = parse_response('<tool_call>{"name": "Delete_memory", "arguments": "{\\"memory_id\\": \\"abc\\"}"}</tool_call>')
    v = validate_call(p.tool_calls[0])
    assert v.ok and v.arguments == {"memory_id": "abc"}


def test_object_containing_a_list_is_one_call() -> None:
    # The reference's parser returned the inner list as "calls" and crashed the task.
    p = parse_response('<tool_call>{"name": "Add_memory", "arguments": {"content": "c", "tags": ["a", "b"]}}</tool_call>')
    assert len(p.tool_calls) == 1 and p.tool_calls[0].name == "Add_memory"


def test_several_objects_in_one_block() -> None:
    p = parse_response('<tool_call>{"name": "A", "arguments": {}}\n{"name": "B", "arguments": {}}</tool_call>')
    assert [c.name for c in p.tool_calls] == ["A", "B"]


def test_calls_inside_think_are_not_executed() -> None:
    p = parse_response('<think>maybe <tool_call>{"name": "Delete_memory", "arguments": {"memory_id": "1"}}'
                       '</tool_call></think><answer>no</answer>')
    assert p.tool_calls == [] and p.ignored_in_think == 1 and p.answer == "no"


def test_unclosed_think_hides_everything_after_it() -> None:
    p = parse_response('<think>thinking <tool_call>{"name": "Add_memory", "arguments": {"content": "x"}}</tool_call>')
    assert p.tool_calls == [] and [i.kind for i in p.issues] == ["unclosed_think"]


def test_malformed_json_is_a_format_error_with_a_message() -> None:
    p = parse_response('<tool_call>{"name": "Add_memory", "arguments": {content: x}}</tool_call>')
    assert p.tool_calls == []
    assert [i.kind for i in p.errors] == ["invalid_json"]
    assert "invalid JSON" in p.errors[0].message


def test_bad_call_shapes() -> None:
    p = parse_response('<tool_call>[1, {"arguments": {}}, {"name": "Add_memory"}]</tool_call>')
    assert [c.name for c in p.tool_calls] == ["Add_memory"]
    assert [i.kind for i in p.errors] == ["bad_call", "bad_call"]


def test_truncated_tool_call() -> None:
    complete = parse_response('<tool_call>{"name": "Add_memory", "arguments": {"content": "x"}}')
    assert len(complete.tool_calls) == 1 and complete.errors == []
    cut = parse_response('<tool_call>{"name": "Add_memory", "argum')
    assert cut.tool_calls == [] and {i.kind for i in cut.errors} == {"invalid_json", "unclosed_tool_call"}


def test_plain_text_has_no_action() -> None:
    p = parse_response("Sure, sounds good!")
    assert not p.has_action and p.errors == []


@pytest.mark.parametrize("text", ["<answer></answer>", "<answer>  \n </answer>", "<think>x</think><answer>",
                                  "<answer>Ken St.</think>\n<answer>"])
def test_an_empty_answer_is_no_answer_and_the_model_hears_it(text: str) -> None:
    p = parse_response(text)
    assert p.answer is None and not p.has_action
    assert [i.kind for i in p.errors] == ["empty_answer"] and "empty" in p.errors[0].message


def test_the_first_non_empty_answer_counts_and_an_unclosed_one_is_accepted() -> None:
    p = parse_response("<answer></answer> then <answer> Paris </answer>")
    assert p.answer == "Paris" and p.issues == []
    cut = parse_response("<answer>Paris")
    assert cut.answer == "Paris" and cut.errors == [] and [i.kind for i in cut.issues] == ["unclosed_answer"]


def test_code_fenced_json() -> None:
    p = parse_response('<tool_call>```json\n{"name": "Add_memory", "arguments": {"content": "x"}}\n```</tool_call>')
    assert len(p.tool_calls) == 1


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text(max_size=400))
def test_parser_never_raises_on_any_text(text: str) -> None:
    p = parse_response(text)
    for issue in p.issues:
        assert issue.message


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_parser_and_validation_never_raise_on_random_json(value) -> None:
    p = parse_response(f"<tool_call>{json.dumps(value)}</tool_call>")
    for call in p.tool_calls:
        v = validate_call(call)
        assert v.ok or v.error
    for issue in p.issues:
        assert issue.message


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["Add_memory", "Update_memory", "Delete_memory", "Retrieve_memory", "Summary_context",
                     "Filter_context", "Clear_context", "Nope", ""]),
    st.dictionaries(st.sampled_from(["content", "memory_id", "query", "top_k", "span", "criteria", "metadata_json",
                                     "memory_type", "x"]), JSON, max_size=5),
)
def test_validation_of_wrong_types_is_a_clear_message(name: str, args: dict) -> None:
    v = validate_call(ToolCall(name=name, arguments=args))
    if not v.ok:
        assert isinstance(v.error, str) and len(v.error) < 400


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=9000, max_size=12000))
def test_huge_strings_are_rejected_not_crashed(big: str) -> None:
    v = validate_call(ToolCall(name="Add_memory", arguments={"content": big + "x"}))
    assert not v.ok and "too long" in (v.error or "")
    p = parse_response(f"<tool_call>{json.dumps({'name': 'Add_memory', 'arguments': {'content': big}})}</tool_call>")
    assert len(p.tool_calls) == 1
