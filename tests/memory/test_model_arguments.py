"""Whatever a model writes into a tool call comes back to it as a tool result, through both clients.

The rules live in agemem/memory/arguments.py and are applied by the engine (validate_call) and
by the service (in-process and over HTTP). Property-based: hypothesis writes arguments the way
a model could (lone surrogates, NUL, huge integers, NaN/Infinity, deep nesting, wrong types) and
sends them through the real in-process client and the real HTTP client on loopback. On loopback
nothing may raise, not even MemoryUnavailableError: a 503 from the store would be a bug too.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agemem.agent.tools import MEMORY_TOOL_NAMES, ToolCall, memory_call_arguments, validate_call
from agemem.memory.base import MEMORY_TOOLS, ToolResult
from agemem.memory.client import HttpMemoryClient, InProcessMemoryClient
from tests.fixtures_memory import ToolServer

MAX_CONTENT_BYTES = 8192  # the memory.max_content_bytes default
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any code point, lone surrogates included (hypothesis leaves those out of st.text() by default).
any_text = st.text(st.characters(codec=None, categories=None) | st.characters(categories=["Cs"]), max_size=40)
nasty = st.sampled_from([
    "\ud83c", "fact \udfff here", "a\x00b", "x" * (MAX_CONTENT_BYTES + 1), "é" * 5000, " ", "", "id\n",
    "0" * 64 + "\n", "general\n", "k" * 65, 'x" or 1==1', "../../etc",
])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=12,
)
deep = st.integers(1, 400).map(lambda n: '{"a": ' + "[" * n + "]" * n + "}")
metadata_json = st.one_of(
    json_value.map(lambda v: json.dumps(v, ensure_ascii=True, allow_nan=True)),  # escapes reach the parser
    st.dictionaries(any_text, json_value, max_size=4).map(lambda d: json.dumps(d, ensure_ascii=False, allow_nan=True)),
    deep,
    st.sampled_from(['{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}', '{"n": 1e400}',
                     '{"n": 18446744073709551616}', '{"n": 9223372036854775808}', '{"k": "\\ud83c"}',
                     '{"k": "\\u0000"}', "[1]", "{not json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"]),
)
value = st.one_of(any_text, nasty, metadata_json, st.integers(-(2**70), 2**70), st.floats(), st.booleans(),
                  st.none(), st.lists(st.integers(), max_size=2))
keys = st.sampled_from(["content", "memory_type", "metadata_json", "memory_id", "query", "top_k", "metadata"])
model_arguments = st.one_of(
    st.dictionaries(keys, value, max_size=4),
    st.fixed_dictionaries({"content": st.one_of(any_text, nasty)}, optional={"metadata_json": metadata_json,
                                                                         "memory_type": st.one_of(any_text, nasty)}),
    st.dictionaries(any_text, value, max_size=2),
)
tool_names = st.sampled_from([*MEMORY_TOOLS, "Bogus", "Add_memory\n", "\ud83c"])

CRASHERS = [  # found by the attack on the server (issue 16 §1, §6, §7)
    ("Add_memory", {"content": "\ud83c"}),
    ("Add_memory", {"content": "ok", "metadata_json": '{"k": "\\ud83c"}'}),
    ("Add_memory", {"content": "ok", "metadata_json": json.dumps({"k": "\ud83c"}, ensure_ascii=False)}),
    ("Add_memory", {"content": "ok", "metadata_json": '{"n": 123456789012345678901234567890}'}),
    ("Add_memory", {"content": "ok", "metadata_json": '{"n": NaN}'}),
    ("Add_memory", {"content": "ok", "metadata_json": '{"a": ' + "[" * 300 + "]" * 300 + "}"}),
    ("Add_memory", {"content": "ok", "memory_type": "t" * 64 + "\n"}),
    ("Delete_memory", {"memory_id": "0" * 32 + "\n"}),
    ("Retrieve_memory", {"query": "q", "top_k": float("nan")}),
]


def _check(result: object) -> ToolResult:
    assert isinstance(result, ToolResult), result
    assert result.ok or result.data.get("error"), result
    json.dumps(result.model_dump(), ensure_ascii=False).encode("utf-8")  # the reply itself is clean text
    return result


@pytest.fixture
async def http_client(tool_server: ToolServer):
    client = HttpMemoryClient(tool_server.base_url, timeout_s=60.0, retries=0)
    yield client
    await client.aclose()


@pytest.mark.parametrize(("tool", "args"), CRASHERS)
async def test_known_crashers_are_tool_errors_in_process(memory_client: InProcessMemoryClient, tool, args) -> None:
    session = await memory_client.create_session()
    result = _check(await memory_client.call_tool(session, tool, args))
    assert not result.ok
    assert await memory_client.list_memories(session) == []


@pytest.mark.parametrize(("tool", "args"), CRASHERS)
async def test_known_crashers_are_tool_errors_over_http(http_client: HttpMemoryClient, tool, args) -> None:
    session = await http_client.create_session()
    result = _check(await http_client.call_tool(session, tool, args))
    assert not result.ok
    assert await http_client.list_memories(session) == []


async def _through(client, session, known_id: str, tool: str, args: dict) -> None:
    if isinstance(args.get("memory_id"), str) and args["memory_id"] == "KNOWN":
        args = {**args, "memory_id": known_id}
    result = _check(await client.call_tool(session, tool, args))
    if result.ok and tool in ("Add_memory", "Update_memory"):
        await client.list_memories(session)  # what was stored reads back (no 500 on GET)


@PROPERTY
@given(tool=tool_names, args=model_arguments)
@example(tool="Update_memory", args={"memory_id": "KNOWN", "content": "new", "metadata_json": '{"n": 1e400}'})
@example(tool="Add_memory", args={"content": "c", "metadata_json": '{"n": 18446744073709551616}'})
async def test_model_arguments_never_raise_in_process(memory_client: InProcessMemoryClient, tool, args) -> None:
    session = await memory_client.create_session()
    known = (await memory_client.call_tool(session, "Add_memory", {"content": "a known memory"})).data["memory_id"]
    await _through(memory_client, session, known, tool, args)
    await memory_client.delete_session(session)


@PROPERTY
@given(tool=tool_names, args=model_arguments)
@example(tool="Update_memory", args={"memory_id": "KNOWN", "content": "\ud83c"})
async def test_model_arguments_never_raise_over_http(http_client: HttpMemoryClient, tool, args) -> None:
    session = await http_client.create_session()
    known = (await http_client.call_tool(session, "Add_memory", {"content": "a known memory"})).data["memory_id"]
    await _through(http_client, session, known, tool, args)
    await http_client.delete_session(session)


@PROPERTY
@given(tool=st.sampled_from(MEMORY_TOOL_NAMES), args=model_arguments)
async def test_what_the_engine_accepts_the_server_accepts(
    memory_client: InProcessMemoryClient, http_client: HttpMemoryClient, tool, args
) -> None:
    """validate_call and the service apply one set of rules: a call the engine lets through is
    never refused by either client for its values (only a missing memory may fail it)."""
    validated = validate_call(ToolCall(tool, args))
    if not validated.ok:
        assert validated.error and isinstance(validated.error, str)
        return
    sent = memory_call_arguments(validated, stage=1)
    for client in (memory_client, http_client):
        session = await client.create_session()
        result = _check(await client.call_tool(session, validated.name, sent))
        assert result.ok or result.data["error"] == "not_found", (client, sent, result)
        await client.delete_session(session)


async def test_http_client_never_raises_an_encoding_error(http_client: HttpMemoryClient) -> None:
    session = await http_client.create_session()
    for tool, args in [
        ("Add_memory", {"content": object()}),  # not JSON at all
        ("Add_memory", {"content": "ok", "metadata_json": float("inf")}),
        ("\ud83c/../x", {"content": "ok"}),
        ("Retrieve_memory", {"query": "\udc80" * 10}),
    ]:
        _check(await http_client.call_tool(session, tool, args))
    odd = session.model_copy(update={"session_id": "bad\ud83c id/.."})
    with pytest.raises(Exception) as info:  # a session problem, told as one
        await http_client.call_tool(odd, "Add_memory", {"content": "x"})
    assert type(info.value).__name__ == "UnknownSessionError"


async def test_trailing_newline_ids_are_404_or_422_never_503(tool_server: ToolServer) -> None:
    """Issue 16 §6: ``id\\n`` passed ``^...$``, reached Milvus and came back as 503."""
    async with httpx.AsyncClient(base_url=tool_server.base_url, timeout=30) as http:
        r = await http.post("/sessions")
        sid, auth = r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}
        for tool, body in [
            ("Delete_memory", {"memory_id": "0" * 32 + "\n"}),
            ("Update_memory", {"memory_id": "a\n", "content": "x"}),
            ("Add_memory", {"content": "x", "memory_type": "t" * 64 + "\n"}),
            ("Retrieve_memory", {"query": "x", "memory_type": "general\n"}),
        ]:
            r = await http.post(f"/sessions/{sid}/tools/{tool}", json=body, headers=auth)
            assert r.status_code == 422, (tool, r.status_code, r.text)
        r = await http.get(f"/sessions/{sid}%0A/memories", headers=auth)
        assert r.status_code == 404, r.text


async def test_deep_or_non_finite_metadata_is_refused_and_listing_still_works(tool_server: ToolServer) -> None:
    """Issue 16 §7: 256-980 levels were stored and then broke GET /memories with a 500; NaN became null."""
    async with httpx.AsyncClient(base_url=tool_server.base_url, timeout=30) as http:
        r = await http.post("/sessions")
        sid, auth = r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}
        for raw in ('{"a": ' + "[" * 600 + "]" * 600 + "}", '{"n": NaN}', '{"n": Infinity}'):
            r = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "c", "metadata_json": raw},
                                headers=auth)
            assert r.status_code == 422 and r.json()["ok"] is False, r.text[:300]
        r = await http.get(f"/sessions/{sid}/memories", headers=auth)
        assert r.status_code == 200 and r.json()["memories"] == []
