"""`gpujobs logs ID`: what a job's tools wrote, kept per attempt (a transcode's whole ffmpeg
stderr)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gpujobs.errors import GpujobsError


def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    attempt: Annotated[
        int | None, typer.Option(help="Only this attempt's log (1 is the first).")
    ] = None,
) -> None:
    """Print a job's logs, oldest attempt first (a transcode's: ffmpeg's whole stderr)."""
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings

    client = Client(Settings(), start_local=False)
    Job(job_id, client).status()  # JobNotFound: one line, exit 1
    entries = client.store.logs(job_id, attempt)
    if not entries:
        which = f"attempt {attempt} of job {job_id}" if attempt is not None else f"job {job_id}"
        raise GpujobsError(f"no log kept for {which}")
    for entry in entries:
        sys.stdout.write(f"== attempt {entry.attempt}: {entry.source} ==\n")
        sys.stdout.write(entry.text if entry.text.endswith("\n") else entry.text + "\n")


def register(app: typer.Typer) -> None:
    """Add `logs` to the gpujobs command."""
    app.command("logs")(logs)
