"""The monitoring commands: `gpujobs flower`, `gpujobs metrics`, `gpujobs top`.

Thin, like main.py: they parse, then call gpujobs.monitor.flower, .metrics and .top.
`register(app)` adds them to the main command.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from gpujobs.cli.options import positive_seconds


def flower(
    address: Annotated[
        str | None, typer.Option(help="Listen address [default: GPUJOBS_FLOWER_ADDRESS].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port; 0 picks one [default: GPUJOBS_FLOWER_PORT]."),
    ] = None,
) -> None:
    """Run Flower for the gpujobs queues (basic auth from GPUJOBS_FLOWER_USER/PASSWORD)."""
    from gpujobs.config import Settings
    from gpujobs.connection import broker_url
    from gpujobs.monitor.flower import run_flower

    settings = Settings()
    run_flower(settings, broker_url(settings, start_local=False), address=address, port=port)


def metrics(
    address: Annotated[
        str | None, typer.Option(help="Listen address [default: GPUJOBS_METRICS_ADDRESS].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port; 0 picks one [default: 9808]."),
    ] = None,
) -> None:
    """Serve Prometheus metrics (queues, jobs, NVENC slots, GPUs, inference) on /metrics."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from gpujobs.config import Settings
    from gpujobs.connection import broker_url, connect
    from gpujobs.monitor.metrics import serve_metrics

    settings = Settings()
    client = connect(broker_url(settings, start_local=False), settings)
    # No retries with backoff (about 15 s) inside a scrape: Prometheus gives up after 10 s and
    # would never see `gpujobs_redis_up 0`. The next scrape is the retry.
    client.set_retry(Retry(NoBackoff(), retries=0))
    host = settings.metrics_address if address is None else address
    console = Console(soft_wrap=True)

    def ready(bound: int) -> None:
        console.print(f"serving metrics on http://{host}:{bound}/metrics", markup=False)

    serve_metrics(client, host, settings.metrics_port if port is None else port, ready=ready)


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one view and exit.")] = False,
    frames: Annotated[
        int | None, typer.Option(min=1, help="Exit after drawing this many views.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Exit after this many seconds.", callback=positive_seconds),
    ] = None,
    refresh: Annotated[
        float, typer.Option(min=0.1, help="Seconds between reads of node heartbeats.")
    ] = 2.0,
) -> None:
    """Live view of nodes, GPUs and jobs (jobs update from Redis events as they happen)."""
    from gpujobs.config import Settings
    from gpujobs.connection import broker_url, connect
    from gpujobs.monitor.top import run_top

    settings = Settings()
    client = connect(broker_url(settings, start_local=False), settings)
    run_top(client, Console(), once=once, frames=frames, timeout_s=timeout, node_refresh_s=refresh)


def register(app: typer.Typer) -> None:
    """Add the monitoring commands to the `gpujobs` command."""
    app.command()(flower)
    app.command()(metrics)
    app.command()(top)
