"""Tool schemas (flat, verl-compatible) and argument validation."""

from __future__ import annotations

import json

import pytest

from agemem.agent.tools import TOOL_NAMES, ToolCall, memory_call_arguments, tool_schemas, validate_call


def test_schemas_are_flat_and_complete() -> None:
    schemas = tool_schemas()
    assert [s["function"]["name"] for s in schemas] == list(TOOL_NAMES)
    for s in schemas:
        for prop in s["function"]["parameters"]["properties"].values():
            assert set(prop) <= {"type", "description", "enum"}
            assert prop["type"] in {"string", "integer"}


def test_ablation_drops_context_tools() -> None:
    names = [s["function"]["name"] for s in tool_schemas(use_context_tools=False)]
    assert names == ["Add_memory", "Update_memory", "Delete_memory"]


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("Add_memory", {"content": " fact "}, {"content": "fact", "memory_type": "general", "metadata": {}}),
        ("Add_memory", {"content": "f", "metadata_json": '{"topic": "film", "n": [1]}'},
         {"content": "f", "memory_type": "general", "metadata": {"topic": "film", "n": "[1]"}}),
        ("Update_memory", {"memory_id": "m1", "content": "new"}, {"memory_id": "m1", "content": "new", "metadata": {}}),
        ("Delete_memory", {"memory_id": 12}, {"memory_id": "12"}),
        ("Retrieve_memory", {"query": "q", "top_k": "5"}, {"query": "q", "top_k": 5}),
        ("Retrieve_memory", {"query": "q"}, {"query": "q", "top_k": 3}),
        ("Summary_context", {}, {"span": "all"}),
        ("Clear_context", {"criteria": "weather"}, {"criteria": "weather"}),
    ],
)
def test_valid_calls(name: str, args: dict, expected: dict) -> None:
    v = validate_call(ToolCall(name=name, arguments=args))
    assert v.ok, v.error
    assert v.arguments == expected


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("Add_memory", {"content": "   "}, "must not be empty"),
        ("Add_memory", {}, "missing required argument 'content'"),
        ("Add_memory", {"content": ["a"]}, "must be a string"),
        ("Add_memory", {"content": "x", "metadata_json": "{bad"}, "not valid JSON"),
        ("Add_memory", {"content": "x", "metadata_json": "[1]"}, "must be a JSON object"),
        ("Add_memory", {"content": "x" * 9000}, "too long"),
        ("Update_memory", {"memory_id": "m"}, "missing required argument 'content'"),
        ("Retrieve_memory", {"query": "q", "top_k": 0}, "between 1 and"),
        ("Retrieve_memory", {"query": "q", "top_k": "many"}, "must be an integer"),
        ("Retrieve_memory", {"query": "q", "top_k": True}, "must be an integer"),
        ("Filter_context", {"criteria": ""}, "must not be empty"),
        ("Launch_rocket", {}, "unknown tool 'Launch_rocket'"),
    ],
)
def test_invalid_calls_give_clear_errors(name: str, args: dict, fragment: str) -> None:
    v = validate_call(ToolCall(name=name, arguments=args))
    assert not v.ok and fragment in (v.error or "")


def test_arguments_not_an_object() -> None:
    assert "must be a JSON object" in validate_call(ToolCall("Add_memory", [1, 2])).error
    assert "not valid JSON" in validate_call(ToolCall("Add_memory", "{oops")).error


def test_disabled_tool_is_reported() -> None:
    v = validate_call(ToolCall("Summary_context", {}), allowed=("Add_memory",))
    assert not v.ok and "disabled" in v.error


def test_engine_records_stage_in_metadata() -> None:
    v = validate_call(ToolCall("Add_memory", {"content": "c", "metadata_json": '{"topic": "t"}'}))
    args = memory_call_arguments(v, stage=1)
    assert json.loads(args["metadata_json"]) == {"topic": "t", "stage": "1"}
    assert "metadata" not in args


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("Add_memory", {"content": "fact \ud83c"}, "lone surrogate"),
        ("Add_memory", {"content": "a\x00b"}, "NUL"),
        ("Add_memory", {"content": "x", "metadata_json": '{"n": 18446744073709551616}'}, "out of range"),
        ("Add_memory", {"content": "x", "metadata_json": '{"n": NaN}'}, "NaN"),
        ("Add_memory", {"content": "x", "metadata_json": '{"a": ' + "[" * 2000 + "]" * 2000 + "}"}, "metadata_json"),
        ("Add_memory", {"content": "x", "metadata": {"k": float("inf")}}, "finite"),
        ("Add_memory", {"content": "x", "memory_type": "bad type!"}, "memory_type"),
        ("Update_memory", {"memory_id": "ab c", "content": "x"}, "not a memory id"),
        ("Delete_memory", {"memory_id": "a" * 65}, "not a memory id"),
        ("Filter_context", {"criteria": "\udfff"}, "lone surrogate"),
    ],
)
def test_values_the_store_cannot_hold_are_refused_here(name: str, args: dict, fragment: str) -> None:
    """The engine applies the memory service's rules (agemem/memory/arguments.py), not looser ones."""
    v = validate_call(ToolCall(name=name, arguments=args))
    assert not v.ok and fragment in (v.error or ""), v.error


def test_deeply_nested_argument_text_is_an_error_not_a_crash() -> None:
    v = validate_call(ToolCall("Add_memory", "[" * 100_000 + "]" * 100_000))
    assert not v.ok and "Add_memory" in v.error
