"""The SDK: submit jobs, then watch, wait for, cancel and read them through a `Job` handle.

Paths given to the SDK are absolute, or relative to the media root. Everything is validated
before anything is queued; a problem raises InvalidSpec with one line that says what is wrong.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from celery import Celery
from pydantic import ValidationError

from gpujobs.app import TRANSCODE_QUEUE, TRANSCODE_TASK, broker_priority, make_app
from gpujobs.config import Settings
from gpujobs.connection import broker_url, connect
from gpujobs.errors import InvalidSpec, JobFailed, JobNotFound
from gpujobs.mediacheck import looks_like_video
from gpujobs.specs import JobKind, JobRecord, JobState, TranscodeSpec
from gpujobs.store import JobStore

INBOX = "inbox"  # where files from outside the media root are copied, under the media root


@dataclass(frozen=True)
class PreparedJob:
    """A checked spec, and the file to copy into the media root before it is queued."""

    spec: TranscodeSpec
    copy_from: Path | None = None


class Client:
    """A connection to one gpujobs cluster (or the local stack). Cheap to make; reuse it."""

    def __init__(self, settings: Settings | None = None, start_local: bool = True) -> None:
        self.settings = settings or Settings()
        self.broker_url = broker_url(self.settings, start_local=start_local)
        self.redis = connect(self.broker_url, self.settings)
        self.store = JobStore(self.redis, record_ttl_s=self.settings.record_ttl_s)
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_app(self.settings, self.broker_url)
        return self._app

    def job(self, job_id: str) -> Job:
        return Job(job_id, self)

    def submit_transcode(
        self,
        input: str | Path,
        output: str | Path | None = None,
        *,
        copy_outside: bool = False,
        **params: Any,
    ) -> Job:
        """Queue a transcode of `input` (see TranscodeSpec for params) and return its Job.

        output: default `<input stem>.<height>p.mp4` beside the input.
        copy_outside: copy an input from outside the media root into `<media root>/inbox`
        first (the CLI does); otherwise such an input is an error.
        """
        return self.enqueue(self.prepare_transcode(input, output, copy_outside, **params))

    def prepare_transcode(
        self,
        input: str | Path,
        output: str | Path | None = None,
        copy_outside: bool = False,
        **params: Any,
    ) -> PreparedJob:
        """Check everything about a transcode without changing anything (InvalidSpec if bad)."""
        defaults = {
            "height": self.settings.default_height,
            "codec": self.settings.default_codec,
            "preset": self.settings.default_preset,
            "cq": self.settings.default_cq,
            "audio": self.settings.default_audio,
            "threads": self.settings.default_threads,
        }
        values = {**defaults, **{k: v for k, v in params.items() if v is not None}}
        # The parameters first, on stand-in paths: a bad --cq is reported before any file check.
        _make_spec({**values, "input": "in.mp4", "output": "out.mp4"})
        source, copy_from = self._input_path(Path(input), copy_outside)
        if output is None:
            output_rel = source.with_name(f"{source.stem}.{values['height']}p.mp4").as_posix()
        else:
            output_rel = self._media_relative(Path(output), "output")
        spec = _make_spec({**values, "input": source.as_posix(), "output": output_rel})
        return PreparedJob(spec=spec, copy_from=copy_from)

    def _input_path(self, given: Path, copy_outside: bool) -> tuple[PurePosixPath, Path | None]:
        """Check the input file; its path relative to the media root, and the file to copy
        there first when it lies outside."""
        path = given.expanduser()
        if not path.is_absolute():
            path = self.settings.media / path
        shown = str(given)
        if given.name.startswith("-"):
            raise InvalidSpec(f"input file name {given.name!r} must not start with '-'")
        if not path.exists():
            raise InvalidSpec(f"input {shown} does not exist")
        if path.is_dir():
            raise InvalidSpec(f"input {shown} is a directory, not a video file")
        if not path.is_file():
            raise InvalidSpec(f"input {shown} is not a regular file")
        if path.stat().st_size == 0:
            raise InvalidSpec(f"input {shown} is empty")
        if not looks_like_video(path):
            raise InvalidSpec(f"input {shown} is not a video file (unrecognised container)")
        media = self.settings.media.resolve()
        resolved = path.resolve()
        if resolved.is_relative_to(media):
            return PurePosixPath(resolved.relative_to(media).as_posix()), None
        if not copy_outside:
            raise InvalidSpec(f"input {shown} is outside the media root {media}")
        target = _inbox_target(resolved, media / INBOX)
        return PurePosixPath(target.relative_to(media).as_posix()), resolved

    def _media_relative(self, given: Path, what: str) -> str:
        if ".." in given.parts:
            raise InvalidSpec(f"{what} path {str(given)!r} must not contain '..'")
        path = given.expanduser()
        if not path.is_absolute():
            path = self.settings.media / path
        media = self.settings.media.resolve()
        resolved = path.parent.resolve() / path.name
        if not resolved.is_relative_to(media):
            raise InvalidSpec(f"{what} {given} is outside the media root {media}")
        if resolved.is_dir():
            raise InvalidSpec(f"{what} {given} is a directory")
        return resolved.relative_to(media).as_posix()

    def enqueue(self, prepared: PreparedJob) -> Job:
        """Copy the input in if needed, record the job and queue it."""
        spec = prepared.spec
        if prepared.copy_from is not None:
            _copy_file(prepared.copy_from, self.settings.media / spec.input)
        job_id = uuid.uuid4().hex[:12]
        record = JobRecord(
            id=job_id,
            kind=JobKind.TRANSCODE,
            state=JobState.QUEUED,
            spec=spec.model_dump(mode="json"),
            created_at=time.time(),
        )
        self.store.create(record)
        try:
            self.app.send_task(
                TRANSCODE_TASK,
                args=[job_id, spec.model_dump(mode="json")],
                task_id=job_id,
                queue=TRANSCODE_QUEUE,
                priority=broker_priority(spec.priority),
            )
        except Exception:
            self.store.delete(job_id)  # never leave a record for a job no queue holds
            raise
        return Job(job_id, self)

    def list(self, limit: int = 50, states: tuple[JobState, ...] = ()) -> list[JobRecord]:
        return self.store.list(limit=limit, states=states)


class Job:
    """A handle on one job. Reads go to the store; nothing is cached."""

    def __init__(self, job_id: str, client: Client | None = None) -> None:
        self.id = job_id
        self.client = client or Client()

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobRecord:
        record = self.client.store.get(self.id)
        if record is None:
            raise JobNotFound(f"no job {self.id!r} (never submitted, or its record expired)")
        return record

    def watch(self, timeout: float | None = None) -> Iterator[JobRecord]:
        """Yield the record now and on every update until the job ends (live, no polling).

        timeout: seconds in all (None: no limit); TimeoutError when it passes.
        """
        try:
            yield from self.client.store.watch([self.id], timeout_s=timeout)
        except KeyError:
            raise JobNotFound(f"no job {self.id!r}") from None

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Block until the job ends and return its final record. timeout: seconds."""
        last = None
        for record in self.watch(timeout=timeout):
            last = record
        assert last is not None
        return last

    def cancel(self) -> bool:
        """Cancel a queued or running job; False when it had already ended."""
        self.status()  # JobNotFound for an unknown id
        return self.client.store.update(
            self.id,
            only_from=(JobState.QUEUED, JobState.RUNNING),
            state=JobState.CANCELLED,
            eta_s=None,
        )

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result; JobFailed when it failed or was cancelled."""
        record = self.wait(timeout=timeout)
        if record.state is not JobState.SUCCEEDED:
            reason = f": {record.error}" if record.error else ""
            raise JobFailed(f"job {self.id} {record.state.value}{reason}")
        return record.result or {}


def _make_spec(values: dict[str, Any]) -> TranscodeSpec:
    try:
        return TranscodeSpec.model_validate(values)
    except ValidationError as exc:
        raise InvalidSpec(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    """One line from pydantic's errors: `field: what is wrong`."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("literal_error", "less_than_equal", "greater_than_equal"):
        message = f"{message}, got {error['input']!r}"
    return f"{field}: {message}" if field else message


def _inbox_target(source: Path, inbox: Path) -> Path:
    """Where a file from outside the media root goes: its name in the inbox, or a free variant
    (an existing file of the same size is taken to be the same file and reused)."""
    target = inbox / source.name
    counter = 1
    while target.exists() and target.stat().st_size != source.stat().st_size:
        target = inbox / f"{source.stem}-{counter}{source.suffix}"
        counter += 1
    return target


def _copy_file(source: Path, target: Path) -> None:
    """Copy under a temporary name, then rename: a worker never reads half a file."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.copying")
    shutil.copyfile(source, partial)
    partial.replace(target)


def submit_transcode(input: str | Path, output: str | Path | None = None, **params: Any) -> Job:
    """Queue a transcode with a new Client (see Client.submit_transcode)."""
    return Client().submit_transcode(input, output, **params)


def get_job(job_id: str) -> Job:
    """A handle on an existing job; JobNotFound when there is no such job."""
    job = Job(job_id)
    job.status()
    return job
