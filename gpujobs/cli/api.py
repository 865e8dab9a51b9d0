"""`gpujobs api`: the OpenAI Batch API (files, batches) over the queue. Thin: it parses, then
calls gpujobs.api.app.serve. `register(app)` adds the command to the main one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from gpujobs.errors import GpujobsError


def api(
    address: Annotated[
        str | None, typer.Option(help="Listen address [default: GPUJOBS_API_ADDRESS, 127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port; 0 picks one [default: GPUJOBS_API_PORT, 8090]."),
    ] = None,
) -> None:
    """Serve the OpenAI Batch API (/v1/files, /v1/batches) over the gpujobs queue.

    Point the `openai` client at it (base_url=http://HOST:PORT/v1, api_key=GPUJOBS_API_KEY).
    """
    from gpujobs.config import Settings

    try:
        from gpujobs.api.app import serve
    except ImportError as exc:  # the api extra is not installed
        raise GpujobsError(
            f"gpujobs api needs the api extra ({exc.name} is missing): pip install 'gpujobs[api]'"
        ) from None
    console = Console(soft_wrap=True)

    def ready(base_url: str) -> None:
        console.print(f"serving the Batch API on {base_url}", markup=False)

    serve(Settings(), address=address, port=port, ready=ready)


def register(app: typer.Typer) -> None:
    """Add `api` to the `gpujobs` command."""
    app.command()(api)
