"""The `gpujobs` command: thin. It parses, calls the SDK or the local stack, and renders.

Every user-facing error is one line on stderr (`error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated

import typer

from gpujobs import local
from gpujobs.cli import api as cli_api
from gpujobs.cli import cluster as cli_cluster
from gpujobs.cli import gpu as cli_gpu
from gpujobs.cli import inference as cli_inference
from gpujobs.cli import logs as cli_logs
from gpujobs.cli import monitor as cli_monitor
from gpujobs.cli import transcode as cli_transcode
from gpujobs.cli.render import (
    console,
    err_console,
    exit_for,
    follow,
    job_detail,
    jobs_table,
    record_json,
)
from gpujobs.client import Client, Job
from gpujobs.config import Settings
from gpujobs.connection import redact
from gpujobs.errors import GpujobsError
from gpujobs.specs import JobState

app = typer.Typer(
    name="gpujobs",
    help="Feed GPUs video transcodes and batch inference through a Celery queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


cli_transcode.register(app)  # gpujobs submit: first in --help, the command most people want


class LogLevel(StrEnum):
    """Log levels both Celery and Python's logging understand."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Show one job's record and how each attempt ended."""
    client = Client(Settings(), start_local=False)
    record = Job(job_id, client).status()
    attempts = client.store.attempts(job_id)
    if as_json:
        console.print_json(json.dumps({**record.model_dump(mode="json"), "attempts": attempts}))
    else:
        console.print(job_detail(record, attempts))


@app.command()
def watch(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Follow jobs live until they end; exits non-zero if any did not succeed."""
    client = Client(Settings(), start_local=False)
    for job_id in job_ids:
        Job(job_id, client).status()
    exit_for(follow(client, job_ids, timeout))


@app.command("ls")
def list_jobs(
    state: Annotated[
        list[JobState] | None, typer.Option("--state", "-s", help="Only jobs in this state.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """List jobs, newest first."""
    records = Client(Settings(), start_local=False).list(limit=limit, states=tuple(state or ()))
    if as_json:
        for record in records:
            print(record_json(record))
    elif not records:
        console.print("no jobs")
    else:
        console.print(jobs_table(records))


@app.command()
def cancel(job_ids: Annotated[list[str], typer.Argument(help="Job ids.")]) -> None:
    """Cancel queued or running jobs (a running transcode is killed, its partial output removed)."""
    client = Client(Settings(), start_local=False)
    jobs = [Job(job_id, client) for job_id in job_ids]
    records = {job.id: job.status() for job in jobs}  # every id must exist before any is touched
    for job in jobs:
        if job.cancel():
            console.print(f"cancelled {job.id}")
        else:
            console.print(f"{job.id} had already {records[job.id].state.value}; nothing to cancel")


@app.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues [default: transcode,inference; "
            "with --gpus: transcode, plus the node's and each GPU's]."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Jobs at once.")] = 1,
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    loglevel: Annotated[LogLevel, typer.Option(case_sensitive=False)] = LogLevel.INFO,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="Supervise one worker per GPU, each pinned to it: all, none (one CPU "
            "worker) or indices like 0,2."
        ),
    ] = None,
    per_gpu: Annotated[int, typer.Option(help="With --gpus: jobs at once on each GPU.")] = 1,
    check: Annotated[
        bool, typer.Option("--check", help="Exit non-zero when this node's heartbeat is stale.")
    ] = False,
) -> None:
    """Run a worker in the foreground (needs the worker extra); --gpus: one per GPU."""
    if check:
        cli_gpu.check_heartbeat()  # the liveness probe: no worker extra, no broker start
        return
    if per_gpu < 1:
        raise GpujobsError(f"--per-gpu must be at least 1, got {per_gpu}")
    try:
        from workers.main import run_worker  # the worker extra: producers never import it
        from workers.supervisor import run_supervisor
    except ImportError as exc:
        raise GpujobsError(
            f"the worker needs the worker extra ({exc.name} is missing): "
            "pip install 'gpujobs[worker]'"
        ) from None
    if gpus is not None:
        shared = [q for q in queues.split(",") if q] if queues else None
        raise typer.Exit(run_supervisor(gpus, per_gpu, shared, loglevel.value))
    if per_gpu != 1:
        raise GpujobsError("--per-gpu goes with --gpus (a single worker takes --concurrency)")
    names = queues or "transcode,inference"
    run_worker([q for q in names.split(",") if q], concurrency, hostname, loglevel.value)


@app.command()
def up() -> None:
    """Start the embedded local stack (Valkey + a worker) if it is not running."""
    settings = Settings()
    if not settings.embedded:
        raise GpujobsError(
            f"GPUJOBS_BROKER_URL is set ({redact(settings.broker_url or '')}): "
            "nothing to start locally"
        )
    url = local.ensure_running(settings)
    console.print(f"local stack up: broker {url}, media root {settings.media}", markup=False)
    flower_url = (local.read_stack(settings) or {}).get("flower_url")
    if flower_url:
        console.print(f"flower {flower_url}", markup=False)


@app.command()
def down() -> None:
    """Stop the embedded local stack (a running job finishes first)."""
    if local.stop(Settings()):
        console.print("local stack stopped")
    else:
        console.print("local stack was not running")


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(min=1, max=600, help="Length of the clip.")] = 10,
) -> None:
    """Generate a 1080p clip with audio and transcode it to 480p on this machine."""
    import subprocess

    settings = Settings()
    clip = settings.media / "demo" / "sample-1080p.mp4"
    clip.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"generating a {seconds:g} s 1080p clip with audio: {clip}", markup=False)
    subprocess.run(
        [settings.ffmpeg_binary(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(clip)],
        check=True,
    )  # fmt: skip
    client = Client(Settings())
    job = client.submit_transcode(clip, settings.media / "demo" / "sample-480p.mp4")
    console.print(f"queued {job.id}", markup=False)
    [record] = follow(client, [job.id], timeout=None)
    exit_for([record])
    result = record.result or {}
    console.print(
        f"output {settings.media / str(record.output)}: {result.get('width')}x"
        f"{result.get('height')} {result.get('video_codec')}, audio {result.get('audio_codec')} "
        f"(copied), {result.get('duration_s')} s, encode path {result.get('encode_path')}",
        markup=False,
    )


cli_gpu.register(app)  # gpujobs gpus, gpujobs doctor
cli_monitor.register(app)  # gpujobs flower, gpujobs metrics, gpujobs top
cli_inference.register(app)  # gpujobs infer, gpujobs results
cli_api.register(app)  # gpujobs api
cli_cluster.register(app)  # gpujobs cluster status|nodes|scale
cli_logs.register(app)  # gpujobs logs


def main() -> None:
    """Entry point: run the CLI, turning every user error into one line and an exit code."""
    args = sys.argv[1:] or ["--help"]  # no command: the help, and exit 0
    try:
        # Not standalone: a usage error reaches us here instead of being drawn as a panel.
        code = app(args, prog_name="gpujobs", standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # a bad option or argument, as Click words it
        format_message = getattr(exc, "format_message", None)  # names the option at fault
        message = format_message() if callable(format_message) else str(exc)
        err_console.print(f"error: {message}", markup=False, highlight=False)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except GpujobsError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except TimeoutError as exc:
        err_console.print(f"error: timed out: {exc}", markup=False, highlight=False)
        sys.exit(124)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
