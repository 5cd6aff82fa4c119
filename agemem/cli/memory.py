"""``agemem serve-tools``: run the memory tool server (also ``python -m agemem.cli.memory``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from agemem.cli.common import ProfileOpt, SetOpt, VerboseOpt, command, new_app, settings_from_cli


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


def main() -> None:
    app = new_app("Run the memory tool server.")
    app.command()(serve_tools)
    app()


if __name__ == "__main__":
    main()
