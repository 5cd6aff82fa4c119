"""``agemem serve-tools``: run the memory tool server (also ``python -m agemem.cli.memory``)."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from agemem.cli.common import ProfileOpt, SetOpt, VerboseOpt, command, new_app, settings_from_cli

logger = logging.getLogger(__name__)


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
    # uvicorn, FastAPI and pymilvus load only when the server really starts (the CLI stays fast).
    import uvicorn

    from agemem.memory.server import create_app
    from agemem.memory.service import MemoryService

    settings = settings_from_cli(profile, sets, **{"memory.host": host, "memory.port": port})
    if settings.memory.embedding_threads:
        import torch

        torch.set_num_threads(settings.memory.embedding_threads)
    service = MemoryService.from_settings(settings)
    app = create_app(service, settings)
    mem = settings.memory
    if mem.host not in ("127.0.0.1", "localhost", "::1") and mem.server_token is None:
        logger.warning("serving on %s without memory.server_token: anyone who reaches it can create sessions", mem.host)
    logger.info("memory tool server on http://%s:%d (store %s)", mem.host, mem.port, settings.memory_uri)
    try:
        uvicorn.run(app, host=mem.host, port=mem.port, log_level="warning", access_log=False)
    finally:
        service.close()


def main() -> None:
    app = new_app("Run the memory tool server.")
    app.command()(serve_tools)
    app()


if __name__ == "__main__":
    main()
