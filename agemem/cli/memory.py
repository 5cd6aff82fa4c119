"""``agemem memory serve|list|show|export|import|delete`` (and ``agemem serve-tools``).

The inspection commands use the admin view: the tool server's ``/admin`` routes with
``memory.server_token`` when ``memory.server_url`` is set, else the store in this process
(``memory.uri``; milvus-lite serves one process at a time, so stop a server using the file first).
A space is named as in ``agemem chat --space NAME``; ``--session`` takes a session id instead
(``agemem memory list`` shows both).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Optional

import typer

from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, new_app, settings_from_cli
from agemem.memory.admin import SessionInfo
from agemem.memory.admin_client import AdminClient, build_admin_client, read_jsonl, write_jsonl
from agemem.memory.service import SessionAuthError, UnknownSessionError
from agemem.memory.spaces import SpaceTokens, backend_key, space_session_id
from agemem.settings import Settings

app = new_app("The memory tool server and the memory it holds (spaces, sessions, export/import).")

NameArg = Annotated[str, typer.Argument(help="Memory space name (as in `agemem chat --space`), or with --session a "
                                             "session id.")]
SessionOpt = Annotated[bool, typer.Option("--session", help="NAME is a session id, not a space name.")]


@command
def serve_tools(
    host: Annotated[
        Optional[str], typer.Option("--host", help="Interface to bind (default memory.host = 127.0.0.1).")
    ] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default memory.port = 8765).")] = None,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the memory tools over HTTP; this process owns the Milvus store (memory.uri)."""
    # The server (uvicorn, FastAPI, pymilvus) loads only when it really starts: the CLI stays fast.
    from agemem.memory.server import serve

    settings = settings_from_cli(profile, sets, **{"memory.host": host, "memory.port": port})
    serve(settings)


app.command("serve", help="Run the memory tool server (same as `agemem serve-tools`).")(serve_tools)


def _admin(settings: Settings, work: Callable[[AdminClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        client = build_admin_client(settings)
        try:
            return await work(client)
        except UnknownSessionError as exc:
            raise LookupError(f"{exc} in {backend_key(settings)} (`agemem memory list` shows them)") from None
        except SessionAuthError as exc:
            raise PermissionError(f"{backend_key(settings)}: {exc}") from None
        finally:
            await client.aclose()

    return asyncio.run(run())


def _target(name: str, is_session: bool) -> str:
    return name if is_session else space_session_id(name)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _row(info: SessionInfo, now: float) -> str:
    name = f"space {info.space}" if info.space else f"session {info.session_id}"
    idle = now - info.last_used if info.last_used is not None else None
    expires = "never" if info.expires_in_s is None else f"in {_age(info.expires_in_s)}"
    return f"{name:<48} {info.memories:>8} {_age(info.age_s(now)):>6} {_age(idle):>6}  {expires}"


@app.command("list")
@command
def list_sessions(
    spaces: Annotated[bool, typer.Option("--spaces", help="Only named memory spaces.")] = False,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Memory spaces (first) and rollout sessions, with memory counts, ages and idle expiry."""
    settings = settings_from_cli(profile, sets)
    infos = _admin(settings, lambda admin: admin.sessions(spaces_only=spaces))
    if as_json:
        typer.echo(json.dumps({"store": backend_key(settings), "sessions": [i.model_dump() for i in infos]}, indent=2))
        return
    now = time.time()
    typer.echo(f"{backend_key(settings)}: {sum(1 for i in infos if i.space)} spaces, "
               f"{sum(1 for i in infos if not i.space)} sessions")
    typer.echo(f"{'space / session':<48} {'memories':>8} {'age':>6} {'idle':>6}  expires")
    for info in infos:
        typer.echo(_row(info, now))


@app.command("show")
@command
def show(
    name: NameArg,
    is_session: SessionOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show the oldest N memories.")] = 50,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """A space's (or session's) memories, oldest first."""
    settings = settings_from_cli(profile, sets)
    target = _target(name, is_session)
    items = _admin(settings, lambda admin: admin.export(target))
    if as_json:
        typer.echo(json.dumps({"session_id": target, "total": len(items),
                               "memories": [m.model_dump() for m in items[:limit]]}, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{target}: {len(items)} memories" + (f" (oldest {limit} shown)" if len(items) > limit else ""))
    for m in items[:limit]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created_at))
        meta = f" {json.dumps(m.metadata, ensure_ascii=False)}" if m.metadata else ""
        typer.echo(f"  {m.memory_id}  {when}  [{m.memory_type}] {m.content}{meta}")


@app.command("export")
@command
def export(
    name: NameArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file (default: stdout).")] = None,
    is_session: SessionOpt = False,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write a space's memories as JSONL (one memory per line, oldest first; `agemem memory import` reads it)."""
    settings = settings_from_cli(profile, sets)
    items = _admin(settings, lambda admin: admin.export(_target(name, is_session)))
    if output is None:
        write_jsonl(items, sys.stdout)
        return
    with output.open("w", encoding="utf-8") as fh:
        n = write_jsonl(items, fh)
    typer.echo(f"exported {n} memories of {name} to {output}", err=True)


@app.command("import")
@command
def import_(
    name: Annotated[str, typer.Argument(help="Memory space to import into (created when missing).")],
    source: Annotated[Path, typer.Argument(help="A JSONL export (`agemem memory export`).")],
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Add an export's memories to a space (ids, types, metadata and times kept; ids it has are skipped)."""
    settings = settings_from_cli(profile, sets)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    items = read_jsonl(source)
    tokens = SpaceTokens.from_settings(settings)

    async def work(admin: AdminClient) -> tuple[int, bool]:
        created = False
        if not any(i.space == name for i in await admin.sessions(spaces_only=True)):
            tokens.put(name, await admin.create_space(name))
            created = True
        return await admin.import_memories(space_session_id(name), items), created

    imported, created = _admin(settings, work)
    typer.echo(f"imported {imported} of {len(items)} memories into {'new ' if created else ''}space {name}")


@app.command("delete")
@command
def delete(
    name: NameArg,
    is_session: SessionOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Delete a space (or session) with all its memories."""
    settings = settings_from_cli(profile, sets)
    target = _target(name, is_session)
    if not yes and not typer.confirm(f"delete {target} and all its memories from {backend_key(settings)}?"):
        raise typer.Exit(1)
    _admin(settings, lambda admin: admin.delete(target))
    if not is_session:
        SpaceTokens.from_settings(settings).forget(name)
    typer.echo(f"deleted {target}")


def main() -> None:
    serve_app = new_app("Run the memory tool server.")
    serve_app.command()(serve_tools)
    serve_app()


if __name__ == "__main__":
    main()
