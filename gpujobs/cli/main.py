"""The `gpujobs` command: thin. It parses, calls the SDK or the local stack, and renders.

Every user-facing error is one line on stderr (`error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import json
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpujobs.cli.lazy import LazyGroup, readable
from gpujobs.cli.options import positive_seconds
from gpujobs.errors import GpujobsError, UsageError

if TYPE_CHECKING:
    from gpujobs.specs import JobRecord
    from gpujobs.store import JobStore

# Commands from the other cli modules are imported when they run (gpujobs/cli/lazy.py).
app = typer.Typer(
    name="gpujobs",
    cls=LazyGroup,
    invoke_without_command=True,  # `gpujobs --version`
    help="Feed GPUs video transcodes and batch inference through a Celery queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain Click help: no `<bool>` placeholders, no rich markup eating `[default: ...]`, and
    # the default of every option shown.
    rich_markup_mode=None,
    context_settings={"show_default": True, "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"gpujobs {version('gpujobs')}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Feed GPUs video transcodes and batch inference through a Celery queue."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# JobState's values, named here so `gpujobs --help` need not import the models (pydantic);
# tests/test_cli_newcomer.py checks the two agree.
STATES = ["queued", "running", "succeeded", "failed", "cancelled"]


class LogLevel(StrEnum):
    """Log levels both Celery and Python's logging understand."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Show one job's record and how each attempt ended."""
    from gpujobs.cli.render import console, job_detail
    from gpujobs.errors import JobNotFound

    store = read_store()
    record = store.get(job_id)
    if record is None:
        raise JobNotFound(f"no job {job_id!r} (never submitted, or its record expired)")
    attempts = store.attempts(job_id) or chunk_attempts(store, record)
    if as_json:
        console.print_json(json.dumps({**record.model_dump(mode="json"), "attempts": attempts}))
    else:
        console.print(job_detail(record, attempts))


@app.command()
def watch(
    job_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Job ids.")],
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Give up after this long.  [default: no limit]",
            callback=positive_seconds,
        ),
    ] = None,
) -> None:
    """Follow jobs live until they end; exits non-zero if any did not succeed."""
    from gpujobs.cli.render import exit_for, follow_or_leave
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings

    client = Client(Settings(), start_local=False)
    for job_id in job_ids:
        Job(job_id, client).status()
    exit_for(follow_or_leave(client, job_ids, timeout))


@app.command("ls")
def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            metavar="STATE",
            help=f"Only jobs in this state ({', '.join(STATES)}); repeat for more.  "
            "[default: every state]",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", min=1, max=10000, help="At most N jobs.")
    ] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array of records.")] = False,
    as_jsonl: Annotated[
        bool, typer.Option("--jsonl", help="One JSON record a line, printed as read.")
    ] = False,
) -> None:
    """List jobs, newest first."""
    from gpujobs.cli.render import console, jobs_table, record_json
    from gpujobs.specs import JobState

    wanted = []
    for name in state or ():
        if name.lower() not in STATES:
            raise UsageError(f"no state {name!r}: a job is {', '.join(STATES[:-1])} or "
                             f"{STATES[-1]}")  # fmt: skip
        wanted.append(JobState(name.lower()))
    records = read_store().list(limit=limit, states=tuple(wanted))
    if as_jsonl:
        for record in records:
            print(record_json(record), flush=True)
    elif as_json:
        print(json.dumps([record.model_dump(mode="json") for record in records], indent=2))
    elif not records:
        console.print("no jobs")
    else:
        console.print(jobs_table(records))


@app.command()
def cancel(job_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Job ids.")]) -> None:
    """Cancel queued or running jobs (a running transcode is killed, its partial output removed)."""
    from gpujobs.cli.render import console
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings

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
            metavar="Q1,Q2",
            help="Queues to consume.  [default: transcode,inference; with --gpus: transcode, "
            "plus the node's and each GPU's]",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(metavar="N", min=1, max=64, help="Jobs at once (1..64).")
    ] = 1,
    hostname: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Celery node name.  [default: gpujobs@<node name>]"),
    ] = None,
    loglevel: Annotated[
        LogLevel,
        typer.Option(metavar="LEVEL", case_sensitive=False, help="DEBUG, INFO, WARNING or ERROR."),
    ] = LogLevel.INFO,
    gpus: Annotated[
        str | None,
        typer.Option(
            metavar="all|none|0,2",
            help="Supervise one worker per GPU, each pinned to it: all, none (one CPU "
            "worker) or indices like 0,2.",
        ),
    ] = None,
    per_gpu: Annotated[
        int, typer.Option(metavar="N", help="With --gpus: jobs at once on each GPU.")
    ] = 1,
    check: Annotated[
        bool, typer.Option("--check", help="Exit non-zero when this node's heartbeat is stale.")
    ] = False,
) -> None:
    """Run a worker in the foreground (needs the worker extra); --gpus: one per GPU."""
    if check:
        from gpujobs.cli.gpu import check_heartbeat

        check_heartbeat()  # the liveness probe: no worker extra, no broker start
        return
    if per_gpu < 1:
        raise UsageError(f"--per-gpu must be at least 1, got {per_gpu}")
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
        raise UsageError("--per-gpu goes with --gpus (a single worker takes --concurrency)")
    names = queues or "transcode,inference"
    run_worker([q for q in names.split(",") if q], concurrency, hostname, loglevel.value)


@app.command()
def up() -> None:
    """Start the embedded local stack (Valkey + a worker) if it is not running."""
    from gpujobs import local
    from gpujobs.cli.render import console
    from gpujobs.config import Settings
    from gpujobs.connection import redact

    settings = Settings()
    if not settings.embedded:
        raise GpujobsError(
            f"GPUJOBS_BROKER_URL is set ({redact(settings.broker_url or '')}): "
            "nothing to start locally"
        )
    url, started = local.ensure_running_started(settings)
    if not started:
        local.wait_worker_ready(settings, url)  # found starting: ready means ready
    said = "started" if started else "already up"
    console.print(
        f"local stack {said}: broker {url}, media root {settings.media}, "
        f"worker {local.stack_worker_name(settings)} ready",
        markup=False, highlight=False,
    )  # fmt: skip
    flower_url = (local.read_stack(settings) or {}).get("flower_url")
    if flower_url:
        console.print(f"flower {flower_url}", markup=False, highlight=False)
    console.print("stop it with `gpujobs down`", markup=False, highlight=False)


@app.command()
def down() -> None:
    """Stop the embedded local stack (a running job finishes or is handed back first)."""
    from gpujobs import local
    from gpujobs.cli.render import console
    from gpujobs.client import Client
    from gpujobs.config import Settings
    from gpujobs.specs import JobState

    settings = Settings()
    url = local.running_url(settings)
    if url is None and local.read_stack(settings) is None:
        console.print("local stack was not running")
        return
    running = 0
    if url is not None:
        with contextlib.suppress(GpujobsError):
            client = Client(settings.model_copy(update={"broker_url": url}), start_local=False)
            running = len(client.list(limit=10000, states=(JobState.RUNNING,)))
    jobs = f"{running} running job{'' if running == 1 else 's'}" if running else "no running job"
    console.print(
        f"stopping the local stack: the worker finishes or hands back {jobs} (up to "
        f"{settings.shutdown_grace_s:g} s), then Flower and Valkey stop",
        markup=False, highlight=False,
    )  # fmt: skip
    if local.stop(settings):
        console.print("local stack stopped")
    else:
        console.print("local stack was not running")


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(min=1, max=600, help="Length of the clip.")] = 10,
) -> None:
    """Generate a 1080p clip with audio and transcode it to 480p on this machine."""
    import subprocess

    from gpujobs.cli.render import console, exit_for, follow_or_leave, open_client
    from gpujobs.config import Settings

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
    client = open_client(settings)
    # The demo's own files: a second run replaces its output rather than refusing.
    output = settings.media / "demo" / "sample-480p.mp4"
    job = client.submit_transcode(clip, output, overwrite=True)
    console.print(f"queued {job.id}", markup=False)
    [record] = follow_or_leave(client, [job.id], timeout=None)
    exit_for([record])
    result = record.result or {}
    # What happened to the audio, from the job's own record of each stream (kept or converted).
    audio: dict[str, Any] = next(
        (s for s in result.get("streams", []) if s.get("kind") == "audio"), {}
    )
    how = "copied" if audio.get("action") == "kept" else audio.get("action", "none")
    console.print(
        f"output {settings.media / str(record.output)}: {result.get('width')}x"
        f"{result.get('height')} {result.get('video_codec')}, audio {result.get('audio_codec')} "
        f"({how}), {result.get('duration_s')} s, encode path {result.get('encode_path')}",
        markup=False,
    )


def chunk_attempts(store: JobStore, record: JobRecord) -> list[dict[str, Any]]:
    """A batch's attempts: each chunk that was resent because its worker was lost, and how many
    times (the watchdog counts them in keys.batch_requeues). Empty for a transcode."""
    from gpujobs import keys

    if record.kind.value != "inference":
        return []
    lost = store.redis.hgetall(keys.batch_requeues(record.id))
    entries = []
    for raw_index, raw_count in sorted(lost.items(), key=lambda kv: int(kv[0])):
        index, count = int(raw_index), int(raw_count)
        times = "once" if count == 1 else f"{count} times"
        entries.append({"chunk": index + 1, "outcome": f"resent {times}: its worker was lost",
                        "resent": count})  # fmt: skip
    return entries


def read_store() -> JobStore:
    """The job store, for commands that only read it (`ls`, `status`): no Celery app is made,
    nothing is imported for sending, and the local stack is never started."""
    from gpujobs.config import Settings
    from gpujobs.connection import broker_url, connect
    from gpujobs.store import JobStore

    settings = Settings()
    return JobStore(connect(broker_url(settings, start_local=False), settings),
                    record_ttl_s=settings.record_ttl_s)  # fmt: skip


def _say_error(message: str) -> None:
    """One line on stderr, as written (no markup: rich is not needed to say it)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def main() -> None:
    """Entry point: run the CLI, turning every user error into one line and an exit code."""
    args = sys.argv[1:] or ["--help"]  # no command: the help, and exit 0
    try:
        # Not standalone: a usage error reaches us here instead of being drawn as a panel.
        command = readable(typer.main.get_command(app))
        code = command.main(args, prog_name="gpujobs", standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # a bad option or argument, as Click words it
        format_message = getattr(exc, "format_message", None)  # names the option at fault
        message = format_message() if callable(format_message) else str(exc)
        _say_error(message)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except GpujobsError as exc:
        _say_error(str(exc))
        sys.exit(exc.exit_code)
    except TimeoutError as exc:
        _say_error(f"timed out: {exc}")
        sys.exit(124)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a GPUJOBS_* setting that does not validate, read by any command
        from gpujobs.config import settings_error  # not before: `--help` stays light

        message = settings_error(exc)
        if message is None:
            raise
        _say_error(message)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
