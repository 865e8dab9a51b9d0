"""`gpujobs retry` (a failed or cancelled job again, same spec) and `gpujobs clean` (old inbox
copies and finished records)."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated

import typer

from gpujobs.cli.render import console
from gpujobs.errors import GpujobsError

if TYPE_CHECKING:
    from gpujobs.client import Client, Job
    from gpujobs.specs import JobRecord

RETRYABLE = ("failed", "cancelled")  # JobState values
DAY_S = 86400.0


def retry_job(client: Client, record: JobRecord) -> Job:
    """Queue a new job with `record`'s spec (and queue); GpujobsError unless it failed or was
    cancelled. The input must still be there; a transcode's is checked again in full."""
    from gpujobs.specs import InferenceSpec, JobKind, TranscodeSpec

    if record.state not in RETRYABLE:
        raise GpujobsError(
            f"job {record.id} is {record.state.value}: only a failed or cancelled job is retried"
        )
    media = client.settings.media
    if record.kind is JobKind.TRANSCODE:
        spec = TranscodeSpec.model_validate(record.spec)
        params = spec.model_dump(exclude={"input", "output"})
        prepared = client.prepare_transcode(
            media / spec.input, media / spec.output, copy_outside=False, **params
        )
        return client.enqueue(prepared, queue=record.queue or "transcode")
    batch = InferenceSpec.model_validate(record.spec)
    return client.submit_inference(
        media / batch.input, media / batch.output, endpoint=batch.endpoint, model=batch.model,
        max_concurrency=batch.max_concurrency, chunk_size=batch.chunk_size,
        request_timeout_s=batch.request_timeout_s, max_retries=batch.max_retries,
        deadline_s=batch.deadline_s, server_wait_s=batch.server_wait_s, priority=batch.priority,
        overwrite=True,  # its own output: what a cancelled run wrote is replaced
    )  # fmt: skip


def retry(
    job_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Failed or cancelled jobs.")],
) -> None:
    """Queue a failed or cancelled job again as a new job with the same spec."""
    from gpujobs.client import Client, Job
    from gpujobs.config import Settings

    client = Client(Settings(), start_local=False)
    records = [Job(job_id, client).status() for job_id in job_ids]  # all exist before any is sent
    for record in records:
        if record.state not in RETRYABLE:
            raise GpujobsError(f"job {record.id} is {record.state.value}: only a failed or "
                               "cancelled job is retried")  # fmt: skip
    for record in records:
        job = retry_job(client, record)
        said = "already queued as" if job.already_queued else "queued"
        console.print(f"{record.id} ({record.state.value}) {said} {job.id}", markup=False)


def _inbox_files(media: Path) -> list[Path]:
    from gpujobs.client import INBOX

    inbox = media / INBOX
    return sorted(p for p in inbox.rglob("*") if p.is_file()) if inbox.is_dir() else []


def clean(
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            metavar="DAYS",
            min=0,
            help="Only what finished (or was copied) longer ago than this.",
        ),
    ] = 2.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would go; remove nothing.")
    ] = False,
) -> None:
    """Remove inbox copies and finished job records older than DAYS.

    An inbox copy (a file `submit` copied in as a job's input) goes when it was copied longer
    ago than DAYS and no queued or running job reads it; outputs, and files no job record names,
    are left alone. Finished records (succeeded, failed, cancelled) go with their attempt history;
    they also expire by themselves after GPUJOBS_RECORD_TTL_S (7 days).
    """
    from gpujobs.client import Client
    from gpujobs.config import Settings

    settings = Settings()
    client = Client(settings, start_local=False)
    cutoff = time.time() - older_than * DAY_S
    records = client.list(limit=1_000_000)
    inputs = {str(r.spec.get("input")) for r in records}
    live_inputs = {str(r.spec.get("input")) for r in records if not r.state.terminal}
    outputs = {str(r.spec.get("output")) for r in records} | {str(r.output) for r in records}
    media = settings.media
    copies = []
    for path in _inbox_files(media):
        name = str(PurePosixPath(path.relative_to(media).as_posix()))
        if name in inputs and name not in live_inputs | outputs and path.stat().st_mtime < cutoff:
            copies.append(path)
    finished = [r for r in records if r.state.terminal and (r.finished_at or 0) < cutoff]
    verb = "would remove" if dry_run else "removed"
    for path in copies:
        if not dry_run:
            path.unlink(missing_ok=True)
        console.print(f"{verb} {path}", markup=False, highlight=False)
    for record in finished:
        if not dry_run:
            client.store.purge(record.id)
        console.print(f"{verb} job {record.id} ({record.state.value})", markup=False)
    console.print(
        f"{verb} {len(copies)} inbox cop{'y' if len(copies) == 1 else 'ies'} and "
        f"{len(finished)} finished record{'' if len(finished) == 1 else 's'} older than "
        f"{older_than:g} day{'' if older_than == 1 else 's'}",
        markup=False, highlight=False,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add `retry` and `clean` to the gpujobs command."""
    app.command("retry")(retry)
    app.command("clean")(clean)
