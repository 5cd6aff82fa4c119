"""Property-based HTTP test of the tool server's OpenAPI spec (schemathesis): no 5xx, ever.

Every operation is called with generated path parameters, headers and bodies, both valid for
the schema (positive) and violating it (negative), against the real server on loopback (the
session-scoped ``tool_server``). Generated ids and tokens only reach the auth checks, so each case
is also replayed inside a real session with its real token, which sends the generated bodies
through argument validation, the embedder and Milvus.

schemathesis' own pytest integration (``from_fixture``) breaks on pytest 9, so the cases come
from each operation's hypothesis strategy in a plain ``@given``.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.fixtures_memory import ToolServer

# Bounded so the whole module stays well under a minute on 2 cores.
MAX_EXAMPLES = 20
OPERATIONS = [
    ("GET", "/healthz"),
    ("POST", "/sessions"),
    ("POST", "/sessions/{session_id}/tools/{tool_name}"),
    ("GET", "/sessions/{session_id}/memories"),
    ("DELETE", "/sessions/{session_id}"),
    # The admin view (403 here: the shared server has no server token; tests/memory/test_admin.py).
    ("GET", "/admin/sessions"),
    ("GET", "/admin/sessions/{session_id}/memories"),
    ("POST", "/admin/sessions/{session_id}/memories"),
    ("DELETE", "/admin/sessions/{session_id}"),
]
REAL_TOOLS = ("Add_memory", "Update_memory", "Delete_memory", "Retrieve_memory")
# What the contract allows; anything else (and any 5xx) is a bug.
ALLOWED = {200, 201, 204, 401, 403, 404, 405, 409, 413, 422}


@pytest.fixture(scope="module")
def api_schema(tool_server: ToolServer):
    return schemathesis.openapi.from_url(f"{tool_server.base_url}/openapi.json")


def test_spec_lists_exactly_the_contract(api_schema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _check(case, response) -> None:
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code in ALLOWED, (case.method, case.formatted_path, response.status_code, response.text[:300])


# A negative case needs something to break: /healthz takes nothing.
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (path == "/healthz" and mode is GenerationMode.NEGATIVE)
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_errors(api_schema, tool_server: ToolServer, method: str, path: str, mode: GenerationMode) -> None:
    base_url = tool_server.base_url
    operation = api_schema[path][method]
    calls: list[int] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=base_url, timeout=30)
        _check(case, response)
        calls.append(response.status_code)
        if "session_id" not in (case.path_parameters or {}):
            return
        # Replay inside a fresh real session (fresh: a generated DELETE must not eat a shared one).
        created = httpx.post(f"{base_url}/sessions", timeout=30).json()
        case.path_parameters["session_id"] = created["session_id"]
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {created['session_token']}"}
        response = case.call(base_url=base_url, timeout=30)
        _check(case, response)
        calls.append(response.status_code)
        if "tool_name" in case.path_parameters:
            # A generated tool name is almost never a real one: also send the body to a real tool.
            case.path_parameters["tool_name"] = REAL_TOOLS[len(calls) % len(REAL_TOOLS)]
            response = case.call(base_url=base_url, timeout=30)
            _check(case, response)
            calls.append(response.status_code)

    run()
    assert calls, "no request was generated"
