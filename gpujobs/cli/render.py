"""How jobs look in a terminal: tables, one-line summaries and live progress bars (rich)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import TaskID

    from gpujobs.client import Client
    from gpujobs.config import Settings
    from gpujobs.specs import JobRecord


# By JobState value (a StrEnum member finds its value's entry), so importing this module does
# not import the models.
STATE_STYLES = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def short_duration(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`; `-` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def job_subject(record: JobRecord) -> str:
    """What the job works on, in a few words (the input's path)."""
    return str(record.spec.get("input", "-"))


def shown(value: object, style: str = "") -> Text:
    """`value` as text drawn as written: a path's `[b]` or `[/x]` is never read as rich
    markup (which would restyle it, hide it, or raise MarkupError and end the command)."""
    return Text(str(value), style=style)


def jobs_table(records: Iterable[JobRecord]) -> Table:
    """One row a job; in 80 columns the input and worker are shortened with `…`, never folded."""
    table = Table(box=None, header_style="bold", padding=(0, 1), pad_edge=False,
                  collapse_padding=True)  # fmt: skip
    fixed = {"ID": 12, "KIND": 9, "STATE": 9, "PROGRESS": 8, "AGE": 5}
    for column in ("ID", "KIND", "STATE", "PROGRESS", "INPUT", "WORKER", "AGE"):
        table.add_column(column, no_wrap=True, overflow="ellipsis", min_width=fixed.get(column),
                         justify="right" if column == "PROGRESS" else "left")  # fmt: skip
    now = time.time()
    for record in records:
        style = STATE_STYLES[record.state]
        table.add_row(
            record.id,
            record.kind.value,
            shown(record.state.value, style),
            f"{record.percent:5.1f}%",
            shown(job_subject(record)),
            shown(record.worker or "-"),
            short_duration(now - record.created_at),
        )
    return table


def job_detail(record: JobRecord, attempts: list[dict[str, Any]] | None = None) -> Table:
    from gpujobs.specs import JobState

    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    style = STATE_STYLES[record.state]
    rows: list[tuple[str, str | Text]] = [
        ("id", record.id),
        ("kind", record.kind.value),
        ("state", shown(record.state.value, style)),
        ("progress", f"{record.percent:.1f}%"),
        ("input", job_subject(record)),
    ]
    planned = record.spec.get("output", "-")
    if record.state is JobState.SUCCEEDED:
        rows.append(("output", str(record.output or planned)))
    elif not record.state.terminal:
        rows.append(("output", f"{planned} (once it succeeds)"))
    elif record.output or (record.result or {}).get("partial"):  # a batch's finished part
        rows.append(("output", f"{record.output or planned} (partial: the job "
                               f"{record.state.value} before every request was done)"))  # fmt: skip
    else:
        rows.append(("output", f"none ({record.state.value}; {planned} was not written)"))
    if record.fps is not None:
        rows.append(("fps", f"{record.fps:.1f}"))
    if record.speed is not None:
        rows.append(("speed", f"{record.speed:.2f}x"))
    if record.eta_s is not None and record.state is JobState.RUNNING:
        rows.append(("eta", short_duration(record.eta_s)))
    for name in ("worker", "node", "gpu", "encode_path"):
        value = getattr(record, name)
        if value:
            rows.append((name.replace("_", " "), str(value)))
    if record.pieces:  # a split job: its pieces, each a job of its own
        rows.append(("pieces", ", ".join(record.pieces)))
    if record.parent:
        rows.append(("piece of", record.parent))
    rows.append(("attempt", str(record.attempt)))
    if record.error:
        rows.append(("error", shown(record.error, "red")))
    if record.started_at and record.finished_at:
        rows.append(("took", f"{record.finished_at - record.started_at:.1f}s"))
    result = record.result or {}
    counts = result.get("request_counts")
    if isinstance(counts, dict):
        done, failed = counts.get("completed", 0), counts.get("failed", 0)
        rows.append(("requests", f"{done} completed, {failed} failed of {counts.get('total')}"))
    chunks = result.get("chunks")
    if isinstance(chunks, dict):
        rows.append(("chunks", f"{chunks.get('done', 0)} of {chunks.get('total', '?')} done"))
    for entry in attempts or []:
        if "chunk" in entry:  # a batch: its chunks are the attempts (see chunk_attempts)
            rows.append((f"chunk {entry['chunk']}", str(entry["outcome"])))
            continue
        reason = f": {entry['reason']}" if entry.get("reason") else ""
        rows.append(
            (f"attempt {entry.get('attempt')}", f"{entry.get('outcome')} on {entry.get('worker')}"
             f"{reason}")
        )  # fmt: skip
    for name, value in rows:  # paths, reasons, worker names: text as written, never markup
        table.add_row(name, value if isinstance(value, Text) else shown(value), end_section=False)
    return table


class JobBars:
    """One progress bar per job with fps, speed, ETA and state, fed with records."""

    def __init__(self, console: Console) -> None:
        # Imported here: `ls` and `status` draw no bars (rich.progress is a third of rich).
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.fields[label]}", style="bold", markup=False),  # a path
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[fps]:>9}"),
            TextColumn("{task.fields[speed]:>7}"),
            TextColumn("eta {task.fields[eta]:>6}"),
            TextColumn("{task.fields[state]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> JobBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, record: JobRecord) -> None:
        from gpujobs.specs import JobState

        fps = f"{record.fps:.0f} fps" if record.fps else ""
        speed = f"{record.speed:.2f}x" if record.speed else ""
        eta = short_duration(record.eta_s) if record.state is JobState.RUNNING else ""
        state = f"[{STATE_STYLES[record.state]}]{record.state.value}[/]"
        if record.attempt > 1:  # an attempt after a lost worker or a retry starts again
            state += f" (attempt {record.attempt})"
        task = self._tasks.get(record.id)
        if task is None:
            label = f"{record.id} {job_subject(record)}"
            # Created at the job's real progress (a refresh may come before the update below):
            # the first frame never shows 0 % for a job that is halfway.
            self._tasks[record.id] = self.progress.add_task(
                label, total=100.0, completed=int(record.percent), label=label, fps=fps,
                speed=speed, eta=eta, state=state,
            )  # fmt: skip
            task = self._tasks[record.id]
        # rich keeps extra keyword arguments as the task's fields, read by the columns above.
        self.progress.update(
            task, completed=record.percent, fps=fps, speed=speed, eta=eta, state=state
        )


# The command's consoles: errors stay on one line whatever the terminal's width, and nothing is
# folded when stdout is a pipe or a file (a path printed in two pieces breaks scripts).
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, soft_wrap=True)


def open_client(settings: Settings) -> Client:
    """A Client for a command that may start the local stack (submit, demo, infer); when it does,
    one line on stderr says so, with Flower's URL and how to stop it."""
    from gpujobs.client import Client

    start_stack(settings)
    return Client(settings)


def start_stack(settings: Settings) -> None:
    """With no broker configured, start the local stack unless it runs; when it starts, one
    line on stderr says so, with Flower's URL and how to stop it."""
    from gpujobs import local

    if settings.embedded:
        _, started = local.ensure_running_started(settings)
        if started:
            flower = (local.read_stack(settings) or {}).get("flower_url")
            where = f"; Flower at {flower}" if flower else ""
            err_console.print(
                f"started the local stack (Valkey and a worker{where}); "
                "stop it with `gpujobs down`",
                markup=False, highlight=False,
            )  # fmt: skip


@contextlib.contextmanager
def leave_running(job_ids: list[str]) -> Iterator[None]:
    """Ctrl-C inside leaves the jobs running and says so, with how to watch or stop them, then
    ends the process with status 130.

    The SIGINT handler writes the line and ends the process at once (os._exit) instead of
    raising KeyboardInterrupt: raised wherever the main thread happens to be, that could land
    inside the progress display's lock, and the display's stop would then wait on it forever
    (seen once in a loaded test run: the process never exited). Nothing is left to clean up:
    the jobs live in Redis, and the watch only held a subscription."""
    ids = " ".join(job_ids)
    line = (
        f"stopped watching; the job{'s go' if len(job_ids) > 1 else ' goes'} on. "
        f"Watch again with `gpujobs watch {ids}`, stop with `gpujobs cancel {ids}`\n"
    )

    def on_sigint(signum: int, frame: object) -> None:
        # os.write, not print: the interrupted code may hold the streams' own locks.
        if sys.stdout.isatty():
            os.write(sys.stdout.fileno(), b"\x1b[?25h\n")  # the bars hid the cursor
        os.write(sys.stderr.fileno(), line.encode())
        os._exit(130)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C is not ours to handle
        yield
        return
    try:
        yield
    except KeyboardInterrupt:  # one raised before the handler was in place
        err_console.print(line.rstrip("\n"), markup=False, highlight=False)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def follow_or_leave(client: Client, job_ids: list[str], timeout: float | None) -> list[JobRecord]:
    """`follow`, but Ctrl-C leaves the jobs running and says how to watch them again."""
    with leave_running(job_ids):
        return follow(client, job_ids, timeout)


def record_json(record: JobRecord) -> str:
    return record.model_dump_json()


def follow(client: Client, job_ids: list[str], timeout: float | None) -> list[JobRecord]:
    """Draw a bar per job until every job ends; the final records."""
    final: dict[str, JobRecord] = {}
    with JobBars(console) as bars:
        for record in client.store.watch(job_ids, timeout_s=timeout):
            bars.update(record)
            if record.state.terminal:
                final[record.id] = record
    return [final[job_id] for job_id in job_ids]


def exit_for(records: list[JobRecord]) -> None:
    from gpujobs.specs import JobState

    failed = [r for r in records if r.state is not JobState.SUCCEEDED]
    for record in failed:
        reason = f": {record.error}" if record.error else ""
        err_console.print(f"job {record.id} {record.state.value}{reason}", markup=False)
    if failed:
        raise typer.Exit(1)
