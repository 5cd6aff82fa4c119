"""``agemem serve-tools``: run the memory tool server (also ``python -m agemem.memory.commands``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from agemem.cli_common import ProfileOpt, SetOpt, configure_logging, settings_from_cli


def serve_tools(
    host: Annotated[
        Optional[str], typer.Option("--host", help="Interface to bind (default memory.host = 127.0.0.1).")
    ] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default memory.port = 8765).")] = None,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Serve the memory tools over HTTP; this process owns the Milvus store (memory.uri)."""
    from agemem.memory.base import MemoryUnavailableError
    from agemem.memory.server import serve

    configure_logging(verbose)
    settings = settings_from_cli(profile, sets, **{"memory.host": host, "memory.port": port})
    try:
        serve(settings)
    except (MemoryUnavailableError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(serve_tools)
    app()


if __name__ == "__main__":
    main()
