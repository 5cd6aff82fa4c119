"""The admin view: ``/admin`` on the tool server (server token), ``agemem memory list|show|export|import|delete``.

Real tool server on loopback over a milvus-lite file, the real embedding model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from agemem.cli import app
from agemem.memory.admin_client import read_jsonl
from agemem.memory.client import HttpMemoryClient
from agemem.memory.spaces import SpaceTokens, open_space
from agemem.settings import load_settings
from tests.fixtures_memory import memory_settings, running_server

TOKEN = "admin-s3cret"


def _cli(sets: list[str], *args: str, input: str | None = None, code: int = 0) -> str:
    res = CliRunner().invoke(app, ["memory", *args, "--profile", "smoke", *[a for s in sets for a in ("--set", s)]],
                             input=input)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res.stdout


async def _fill(base_url: str, spaces_file: Path) -> None:
    """A named space with three memories and an ordinary (rollout) session with one."""
    http = HttpMemoryClient(base_url, server_token=TOKEN, timeout_s=30.0, retries=1)
    try:
        space = await open_space(http, SpaceTokens(spaces_file, base_url), "notes")
        for content, kind, meta in (("the office is on floor 3", "user_info", "{}"),
                                    ("prefers answers in French", "preference", '{"source": "chat"}'),
                                    ("Zoë's birthday is 3 May", "user_info", '{"stage": "0"}')):
            result = await http.call_tool(space, "Add_memory", {"content": content, "memory_type": kind,
                                                                "metadata_json": meta})
            assert result.ok, result.text
        rollout = await http.create_session()
        assert (await http.call_tool(rollout, "Add_memory", {"content": "a rollout fact"})).ok
    finally:
        await http.aclose()


def test_admin_routes_need_the_server_token(tmp_path: Path) -> None:
    with running_server(memory_settings(tmp_path, server_token=TOKEN)) as (base_url, _s, _svc):
        assert httpx.get(f"{base_url}/admin/sessions").status_code == 401
        wrong = httpx.get(f"{base_url}/admin/sessions", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "nope" not in wrong.text
        ok = httpx.get(f"{base_url}/admin/sessions", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json() == {"sessions": []}
        missing = httpx.get(f"{base_url}/admin/sessions/space-none/memories", headers={"Authorization": f"Bearer {TOKEN}"})
        assert missing.status_code == 404
        auth = {"Authorization": f"Bearer {TOKEN}"}
        created = httpx.post(f"{base_url}/sessions", json={"space": "ops"}, headers=auth)
        assert created.status_code == 201 and created.json()["session_id"] == "space-ops"
        assert httpx.post(f"{base_url}/sessions", json={"space": "ops"}, headers=auth).status_code == 409
        assert httpx.post(f"{base_url}/sessions", json={"space": "a b"}, headers=auth).status_code == 422
        garbage = httpx.post(f"{base_url}/sessions", content=b"\xff{", headers=auth)
        assert garbage.status_code == 422 and "Invalid JSON" in garbage.json()["detail"]
        assert httpx.post(f"{base_url}/admin/sessions/space-ops/memories", content=b"[", headers=auth).status_code == 422
    with running_server(memory_settings(tmp_path, "open.db")) as (base_url, _s, _svc):
        off = httpx.get(f"{base_url}/admin/sessions", headers={"Authorization": "Bearer anything"})
        assert off.status_code == 403 and "memory.server_token" in off.json()["detail"]


def test_list_show_export_delete_import_round_trip_over_http(tmp_path: Path) -> None:
    with running_server(memory_settings(tmp_path, server_token=TOKEN)) as (base_url, _s, _svc):
        spaces_file = tmp_path / "client" / "memory-spaces.json"
        asyncio.run(_fill(base_url, spaces_file))
        sets = [f"runs_dir={tmp_path / 'client'}", f"memory.server_url={base_url}", f"memory.server_token={TOKEN}"]

        listed = json.loads(_cli(sets, "list", "--json"))
        rows = {(r["space"], r["memories"]) for r in listed["sessions"]}
        assert listed["store"] == base_url and rows == {("notes", 3), (None, 1)}
        assert listed["sessions"][0]["space"] == "notes" and listed["sessions"][0]["expires_in_s"] is None
        assert 0 < listed["sessions"][1]["expires_in_s"] <= 3600
        text = _cli(sets, "list")
        assert "1 spaces, 1 sessions" in text and "space notes" in text
        assert [r["space"] for r in json.loads(_cli(sets, "list", "--spaces", "--json"))["sessions"]] == ["notes"]

        shown = _cli(sets, "show", "notes")
        assert "space-notes: 3 memories" in shown and "[preference] prefers answers in French" in shown

        export = tmp_path / "notes.jsonl"
        _cli(sets, "export", "notes", "-o", str(export))
        exported = read_jsonl(export)
        assert [m.content for m in exported] == ["the office is on floor 3", "prefers answers in French",
                                                 "Zoë's birthday is 3 May"]
        assert export.read_text(encoding="utf-8") == _cli(sets, "export", "notes")  # stdout is the same JSONL

        _cli(sets, "delete", "notes", input="n\n", code=1)  # asks first; no deletes nothing
        assert len(read_jsonl_from(_cli(sets, "export", "notes"), tmp_path)) == 3
        _cli(sets, "delete", "notes", "--yes")
        assert [r["space"] for r in json.loads(_cli(sets, "list", "--json"))["sessions"]] == [None]
        res = CliRunner().invoke(app, ["memory", "show", "notes", "--profile", "smoke",
                                       *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 2 and "agemem memory list" in res.output and "Traceback" not in res.output

        # Import brings the space back as it was: ids, types, metadata, times.
        assert "imported 3 of 3 memories into new space notes" in _cli(sets, "import", "notes", str(export))
        again = tmp_path / "again.jsonl"
        _cli(sets, "export", "notes", "-o", str(again))
        assert again.read_text(encoding="utf-8") == export.read_text(encoding="utf-8")
        assert "imported 0 of 3" in _cli(sets, "import", "notes", str(export))  # twice adds nothing
        # Into another space: the same memories under fresh ids (a memory id is unique store-wide).
        assert "imported 3 of 3" in _cli(sets, "import", "copy", str(export))
        copy = read_jsonl_from(_cli(sets, "export", "copy"), tmp_path)
        assert [(m.content, m.memory_type, m.metadata, m.created_at) for m in copy] == \
            [(m.content, m.memory_type, m.metadata, m.created_at) for m in exported]
        assert not {m.memory_id for m in copy} & {m.memory_id for m in exported}

        # The re-imported space is usable by chat: its token was kept on import.
        async def search() -> str:
            http = HttpMemoryClient(base_url, server_token=TOKEN, timeout_s=30.0, retries=1)
            try:
                space = await open_space(http, SpaceTokens(spaces_file, base_url), "notes")
                return (await http.call_tool(space, "Retrieve_memory", {"query": "birthday"})).text
            finally:
                await http.aclose()

        assert "Zoë" in asyncio.run(search())

        wrong = CliRunner().invoke(app, ["memory", "list", "--profile", "smoke", "--set", f"runs_dir={tmp_path}",
                                         "--set", f"memory.server_url={base_url}", "--set", "memory.server_token=nope-token"])
        assert wrong.exit_code == 2 and "wrong server token" in wrong.output and "Traceback" not in wrong.output

        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"memory_id": "x", "content": "ok"}\nnot json\n', encoding="utf-8")
        res = CliRunner().invoke(app, ["memory", "import", "notes", str(bad), "--profile", "smoke",
                                       *[a for s in sets for a in ("--set", s)]])
        assert res.exit_code == 2 and "bad.jsonl:2" in res.output


def read_jsonl_from(text: str, tmp_path: Path) -> list:
    path = tmp_path / "stdout.jsonl"
    path.write_text(text, encoding="utf-8")
    return read_jsonl(path)


def test_inspection_without_a_server_reads_the_local_store(tmp_path: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(tmp_path / "runs"),
                                       "chat": {"policy": "scripted", "space": "local"}})
    from agemem.chat import MemoryAgent

    async def remember() -> None:
        agent = MemoryAgent.from_settings(settings)
        try:
            await (await agent.conversation()).say("my locker code is 4521")
        finally:
            await agent.aclose()

    asyncio.run(remember())
    sets = [f"runs_dir={tmp_path / 'runs'}"]
    listed = json.loads(_cli(sets, "list", "--json"))
    assert [(r["space"], r["memories"]) for r in listed["sessions"]] == [("local", 1)]
    assert "my locker code is 4521" in _cli(sets, "show", "local")
    res = CliRunner().invoke(app, ["memory", "show", "nope", "--profile", "smoke", "--set", sets[0]])
    assert res.exit_code == 2 and "unknown session" in res.output
