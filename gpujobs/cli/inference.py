"""The batch inference commands: `gpujobs infer`, `gpujobs results`, and `gpujobs submit` of a
`.jsonl` file (cli.py hands those here).

Thin, like cli.py: they parse, call the SDK (gpujobs/batch.py does the checking and queueing),
and render. `register(app)` adds the commands to the main one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from gpujobs.cli.options import positive_seconds
from gpujobs.cli.render import STATE_STYLES, start_stack
from gpujobs.errors import GpujobsError, InvalidSpec

if TYPE_CHECKING:
    from gpujobs.client import Client
    from gpujobs.specs import JobRecord

# Paths stay whole on one line (to copy them) whatever the terminal's width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def is_batch_file(path: Path) -> bool:
    """A `.jsonl` input is a batch of requests, not a video."""
    return path.suffix.lower() == ".jsonl"


class BatchBars:
    """One bar per batch: requests done of total, failed, requests/s, tokens/s, state."""

    def __init__(self, out: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[label]}", style="bold", markup=False),  # a path
            BarColumn(),
            TextColumn("{task.completed:>6.0f}/{task.total:.0f} done"),
            TextColumn("[red]{task.fields[failed]:>5} failed[/]"),
            TextColumn("{task.fields[rps]:>8} req/s"),
            TextColumn("{task.fields[tps]:>9} tok/s"),
            TextColumn("{task.fields[state]}"),
            console=out,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> BatchBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, record: JobRecord) -> None:
        result = record.result or {}
        counts = result.get("request_counts") or {}
        total = float(counts.get("total") or record.spec.get("requests") or 1)
        failed = int(counts.get("failed", 0))
        done = int(counts.get("completed", 0)) + failed
        fields: dict[str, Any] = {
            "failed": failed,
            "rps": f"{float(result.get('requests_per_s', 0.0)):.1f}",
            "tps": f"{float(result.get('tokens_per_s', 0.0)):.0f}",
            "state": f"[{STATE_STYLES[record.state]}]{record.state.value}[/]",
        }
        if result.get("waiting") and not record.state.terminal:  # the server is away
            fields["state"] = f"[yellow]{escape(str(result['waiting']))}[/]"
        task = self._tasks.get(record.id)
        if task is None:
            label = f"{record.id} {Path(str(record.spec.get('source') or '')).name}"
            task = self.progress.add_task(label, total=total, label=label, **fields)
            self._tasks[record.id] = task
        self.progress.update(task, completed=done, total=total, **fields)


def _cwd_path(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


def submit_batches(
    files: list[Path],
    output: Path | None,
    params: dict[str, Any],
    wait: bool,
    timeout: float | None,
    as_json: bool,
    transcode_options: dict[str, Any] | None = None,
) -> None:
    """Check every batch file, then queue each; with `wait`, draw bars until they end.

    transcode_options: options of `gpujobs submit` that mean nothing to a batch; any given is
    an error rather than silently ignored.
    """
    from gpujobs.batch import enqueue_batches, prepare_batch
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings
    from gpujobs.specs import JobState

    if not all(is_batch_file(f) for f in files):
        raise InvalidSpec("batch files (.jsonl) and videos go in separate submits")
    given = [name for name, value in (transcode_options or {}).items() if value is not None]
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        verb = "does" if len(given) == 1 else "do"
        raise InvalidSpec(f"{flags} {verb} not apply to a batch file (see gpujobs infer --help)")
    if output is not None and len(files) > 1:
        raise InvalidSpec("--output takes one batch file; drop it to name outputs per input")
    settings = Settings()
    out = None if output is None else _cwd_path(output)
    # Every file is checked before the broker is touched: a refused batch starts no stack.
    prepared = [prepare_batch(settings, _cwd_path(f), out, **params) for f in files]
    start_stack(settings)
    client = Client(settings)
    ids = enqueue_batches(prepared, settings=client.settings, store=client.store, app=client.app)
    jobs = [Job(job_id, client) for job_id in ids]  # all or none: every file written first
    if not wait:
        for job, batch in zip(jobs, prepared, strict=True):
            if as_json:
                console.print_json(job.status().model_dump_json())
            else:
                console.print(
                    f"queued {job.id}  {batch.spec.requests} request"
                    f"{'' if batch.spec.requests == 1 else 's'} from {batch.spec.source}",
                    markup=False,
                )
        return
    final: dict[str, JobRecord] = {}
    with BatchBars(console) as bars:
        for record in client.store.watch([job.id for job in jobs], timeout_s=timeout):
            bars.update(record)
            if record.state.terminal:
                final[record.id] = record
    records = [final[job.id] for job in jobs]
    for record in records:
        if as_json:
            console.print_json(record.model_dump_json())
        else:
            console.print(summary_line(client, record), markup=False)
    failed = [r for r in records if r.state is not JobState.SUCCEEDED]
    for record in failed:
        reason = f": {record.error}" if record.error else ""
        err_console.print(f"job {record.id} {record.state.value}{reason}", markup=False)
    if failed:
        raise typer.Exit(1)


def summary_line(client: Client, record: JobRecord) -> str:
    """`ID succeeded: 498 completed, 2 failed; output PATH; errors PATH`."""
    result = record.result or {}
    counts = result.get("request_counts") or {}
    media = client.settings.media
    text = (
        f"{record.id} {record.state.value}: {counts.get('completed', 0)} completed, "
        f"{counts.get('failed', 0)} failed"
    )
    if result.get("not_attempted"):
        text += f", {result['not_attempted']} not attempted"
    if result.get("output") and (media / result["output"]).exists():
        text += f"; output {media / result['output']}; errors {media / result['errors_output']}"
    return text


def infer(
    files: Annotated[list[Path], typer.Argument(help="OpenAI batch files (.jsonl).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Results file (one input only).")
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Server base URL, as workers see it (default: GPUJOBS_VLLM_ENDPOINT)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model for every request (default: each body's).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight, the server's max_num_seqs [10].")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Requests per chunk task [250].")] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds one request may take [600].")
    ] = None,
    max_retries: Annotated[
        int | None, typer.Option(help="Retries after 429, 5xx or a lost connection [5].")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option(help="Seconds after which unfinished requests fail.")
    ] = None,
    server_wait: Annotated[
        float | None, typer.Option(help="Seconds to wait for the server to come up [120].")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="0 (lowest) .. 9 (most urgent).")] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing results file (refused otherwise)."),
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Draw progress until the jobs end.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="With --wait: give up after this many seconds.", callback=positive_seconds
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print job records as JSON.")] = False,
) -> None:
    """Queue a batch inference job for each FILE (all are checked before any is queued)."""
    params = {
        "endpoint": endpoint, "model": model, "max_concurrency": concurrency,
        "chunk_size": chunk_size, "request_timeout_s": request_timeout,
        "max_retries": max_retries, "deadline_s": deadline, "server_wait_s": server_wait,
        "priority": priority, "overwrite": overwrite,
    }  # fmt: skip
    submit_batches(files, output, params, wait, timeout, as_json)


def results(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    stream: Annotated[
        bool, typer.Option("--stream", help="Write the results file to stdout.")
    ] = False,
    errors: Annotated[
        bool, typer.Option("--errors", help="The errors file (failed requests) instead.")
    ] = False,
) -> None:
    """Say where a job's output is (or stream it with --stream)."""
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings
    from gpujobs.specs import JobKind, JobState

    client = Client(Settings(), start_local=False)
    record = Job(job_id, client).status()
    media = client.settings.media
    if record.kind is not JobKind.INFERENCE:
        if record.state is not JobState.SUCCEEDED or not record.output:
            raise GpujobsError(f"job {job_id} is {record.state.value}; it has no output")
        console.print(str(media / record.output), markup=False)
        return
    result = record.result or {}
    counts = result.get("request_counts") or {}
    output = media / str(result.get("output") or record.spec["output"])
    errors_output = media / str(result.get("errors_output") or "")
    if not output.exists():
        if not record.state.terminal:
            done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
            raise GpujobsError(
                f"job {job_id} is {record.state.value} ({done}/{counts.get('total', '?')} "
                "requests); its output is written when it ends"
            )
        reason = f": {record.error}" if record.error else ""
        raise GpujobsError(f"job {job_id} {record.state.value} with no output{reason}")
    chosen = errors_output if errors else output
    if stream:
        with chosen.open("rb") as handle:
            shutil.copyfileobj(handle, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    partial = " (partial: the job was cancelled)" if result.get("partial") else ""
    console.print(
        f"{record.id} {record.state.value}: {counts.get('completed', 0)} completed, "
        f"{counts.get('failed', 0)} failed of {counts.get('total', 0)}{partial}",
        markup=False,
    )
    console.print(f"output  {output}", markup=False)
    console.print(f"errors  {errors_output}", markup=False)


def register(app: typer.Typer) -> None:
    """Add `infer` and `results` to the main command."""
    app.command("infer")(infer)
    app.command("results")(results)
