"""The tool-argument rules (agemem/memory/arguments.py): one source for the engine and the service."""

from __future__ import annotations

import json

import pytest

from agemem.agent.tools import ToolCall, validate_call
from agemem.memory import arguments as A
from agemem.memory.arguments import ArgumentError, ArgumentLimits

LIMITS = ArgumentLimits.defaults()


@pytest.mark.parametrize("bad", ["\ud83c", "a\x00b", "x" * (LIMITS.max_content_bytes + 1), "   ", 5])
def test_text_rules(bad) -> None:
    with pytest.raises(ArgumentError) as info:
        A.check_text("content", bad, LIMITS)
    assert "'content'" in str(info.value)
    assert A.check_text("content", "  é fact ", LIMITS) == "é fact"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"n": NaN}', "NaN"),
        ('{"n": Infinity}', "Infinity"),
        ('{"n": 1e400}', "finite"),
        ('{"n": 9223372036854775808}', "out of range"),
        ('{"n": -9223372036854775809}', "out of range"),
        ('{"k": "\\ud83c"}', "lone surrogate"),
        ('{"\\u0000": 1}', "NUL"),
        ('{"a": ' + "[" * 300 + "]" * 300 + "}", "nests deeper"),
        ('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", "too long"),
        ("[1]", "JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_metadata_rules(raw: str, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        A.parse_metadata_json(raw, LIMITS)
    assert fragment in str(info.value)


def test_metadata_limits_are_what_milvus_stores() -> None:
    ok = {"max": A.INT64_MAX, "min": A.INT64_MIN, "f": 1.5, "nested": [[[{"x": None}]]], "": True}
    assert A.parse_metadata_json(json.dumps(ok), LIMITS) == ok
    with pytest.raises(ArgumentError, match="too large"):
        A.check_metadata({"pad": "p" * LIMITS.max_metadata_bytes}, LIMITS)


@pytest.mark.parametrize("token", ["abc\n", "abc\r\n", "", "a" * 65, "a b", "é", "\ud83c", None, 5])
def test_ids_are_full_match_safe_tokens(token) -> None:
    """``^...$`` let a trailing newline through (issue 16 §6)."""
    assert not A.is_safe_token(token)
    with pytest.raises(ArgumentError):
        A.check_memory_id(token)
    assert A.is_safe_token("a" * 64) and A.is_safe_token("Mem_1-x")


def test_engine_and_service_share_the_limits(tmp_path) -> None:
    """One source: the engine enforces the settings' limits, not constants of its own."""
    from agemem.settings import load_settings

    mem = load_settings("smoke", {"runs_dir": str(tmp_path), "memory": {"max_content_bytes": 100, "max_top_k": 5}}).memory
    limits = ArgumentLimits.from_settings(mem)
    assert not validate_call(ToolCall("Add_memory", {"content": "x" * 101}), limits=limits).ok
    assert validate_call(ToolCall("Add_memory", {"content": "x" * 100}), limits=limits).ok
    assert "between 1 and 5" in validate_call(ToolCall("Retrieve_memory", {"query": "q", "top_k": 6}), limits=limits).error
    assert validate_call(ToolCall("Retrieve_memory", {"query": "q", "top_k": 5}), limits=limits).ok
