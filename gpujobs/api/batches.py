"""Batches (`/v1/batches`) over gpujobs inference jobs, and their output files.

A batch is the job `batch_<job id>` names. What the job record does not hold (input_file_id,
endpoint, completion_window, metadata) is kept in keys.api_batch; everything that changes
(status, request_counts, usage, output files, timestamps) is derived from the record on every
read. Status from the record:

    queued                          -> validating (checked, waiting for a worker)
    running                         -> in_progress; finalizing once every request is done
    succeeded                       -> completed
    failed                          -> failed
    succeeded/failed past deadline  -> expired (completion_window, as the job's deadline_s)
    cancelled                       -> cancelling until every chunk has settled, then cancelled

Output files: `file-out-<job id>` holds the lines that succeeded (as OpenAI's output_file_id),
`file-err-<job id>` the lines that failed (the job's errors file). The job's own output keeps
every line in input order, as `gpujobs results` shows it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gpujobs import keys
from gpujobs.api.errors import ApiError, not_found
from gpujobs.api.files import FileStore, file_object
from gpujobs.batch import BATCHES, batch_lines, prepare_batch
from gpujobs.client import Client, Job
from gpujobs.errors import InvalidSpec
from gpujobs.specs import INFERENCE_URLS, InferenceSpec, JobRecord, JobState

BATCH_ID = re.compile(r"^batch_([0-9a-f]{12})$")
OUTPUT_ID = re.compile(r"^file-(out|err)-([0-9a-f]{12})$")
WINDOWS = {"24h": 24 * 3600}  # completion_window -> the job's deadline_s
OUTPUTS_DIR = "api/outputs"  # the succeeded lines of finished batches, under the media root
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


class BatchCreate(BaseModel):
    """The body of `POST /v1/batches`. output_expires_after is taken and ignored: outputs stay
    until deleted (gpujobs never removes an output)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None


def check_create(body: BatchCreate) -> None:
    """ApiError 400 for an endpoint, window or metadata the Batch API would refuse."""
    if body.endpoint not in INFERENCE_URLS:
        raise ApiError(
            400,
            f"Invalid value for 'endpoint': {body.endpoint!r} is not supported here (use "
            f"{', '.join(INFERENCE_URLS)}).",
            param="endpoint",
        )
    if body.completion_window not in WINDOWS:
        raise ApiError(
            400,
            f"Invalid value for 'completion_window': {body.completion_window!r} (only '24h').",
            param="completion_window",
        )
    metadata = body.metadata or {}
    if len(metadata) > METADATA_PAIRS:
        raise ApiError(
            400, f"Invalid 'metadata': at most {METADATA_PAIRS} pairs, got {len(metadata)}.",
            param="metadata",
        )  # fmt: skip
    for key, value in metadata.items():
        if len(key) > METADATA_KEY or len(value) > METADATA_VALUE:
            raise ApiError(
                400,
                f"Invalid 'metadata': keys hold at most {METADATA_KEY} characters and values "
                f"{METADATA_VALUE} (key {key[:70]!r}).",
                param="metadata",
            )


def derive_status(record: JobRecord) -> str:
    """The Batch API status of a job record (see the module's table)."""
    result = record.result or {}
    counts = result.get("request_counts") or {}
    if record.state is JobState.QUEUED:
        return "validating"
    if record.state is JobState.RUNNING:
        done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
        return "finalizing" if done >= int(counts.get("total", 1)) else "in_progress"
    if record.state is JobState.CANCELLED:
        chunks = result.get("chunks") or {}
        settled = int(chunks.get("done", 0)) >= int(chunks.get("total", 0))
        return "cancelled" if settled else "cancelling"
    if _expired(record):
        return "expired"
    return "completed" if record.state is JobState.SUCCEEDED else "failed"


def _expired(record: JobRecord) -> bool:
    deadline = record.spec.get("deadline_s")
    return (
        deadline is not None
        and record.finished_at is not None
        and record.finished_at >= record.created_at + float(deadline)
    )


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


class BatchService:
    """Create, read, list and cancel batches; find and serve their output files."""

    def __init__(self, client: Client, files: FileStore) -> None:
        self.client = client
        self.files = files
        self.media = client.settings.media

    # --- batches -------------------------------------------------------------------------------

    def create(self, body: BatchCreate) -> dict[str, Any]:
        """Queue the batch an uploaded file holds; its Batch object (status `validating`).

        ApiError 400 for an unknown input file, another purpose, or a line whose url is not
        the batch's endpoint; nothing is queued then.
        """
        check_create(body)
        try:
            upload = self.files.get(body.input_file_id)
        except ApiError:
            raise ApiError(
                400, f"Invalid 'input_file_id': no such File object: {body.input_file_id}",
                param="input_file_id",
            ) from None  # fmt: skip
        if upload["purpose"] != "batch":
            raise ApiError(
                400, f"File {body.input_file_id} was uploaded with purpose "
                f"{upload['purpose']!r}, not 'batch'.", param="input_file_id",
            )  # fmt: skip
        path = self.files.content_path(body.input_file_id)
        _check_urls(path, body.endpoint, body.input_file_id)
        try:
            prepared = prepare_batch(
                self.client.settings, path, deadline_s=WINDOWS[body.completion_window]
            )
        except InvalidSpec as exc:  # the file changed since it was checked at upload
            raise ApiError(400, f"Invalid batch file: {exc}", param="input_file_id") from None
        job_id = prepared.job_id
        output = f"{BATCHES}/{job_id}/output.jsonl"
        prepared.spec = prepared.spec.model_copy(update={"output": output})
        meta_key = keys.api_batch(job_id)
        redis = self.client.redis
        created = time.time()
        with redis.pipeline() as pipe:
            pipe.hset(meta_key, mapping={
                "input_file_id": body.input_file_id,
                "endpoint": body.endpoint,
                "completion_window": body.completion_window,
                "metadata": json.dumps(body.metadata or {}),
                "model": _first_model(path) or "",
            })  # fmt: skip
            # Lives as long as the record can: the window, then the record's TTL.
            ttl = WINDOWS[body.completion_window] + self.client.settings.record_ttl_s
            pipe.expire(meta_key, ttl)
            pipe.zadd(keys.API_BATCHES, {job_id: created})
            pipe.execute()
        try:
            self.client.enqueue_batch(prepared)
        except BaseException:
            redis.delete(meta_key)
            redis.zrem(keys.API_BATCHES, job_id)
            raise
        return self.get(f"batch_{job_id}")

    def _load(self, batch_id: str) -> tuple[JobRecord, dict[str, str]]:
        match = BATCH_ID.match(batch_id)
        if match is None:
            raise not_found("Batch", batch_id)
        job_id = match.group(1)
        meta: dict[str, str] = self.client.redis.hgetall(keys.api_batch(job_id))  # type: ignore[assignment,unused-ignore]
        record = self.client.store.get(job_id) if meta else None
        if record is None:
            raise not_found("Batch", batch_id)
        return record, {_text(k): _text(v) for k, v in meta.items()}

    def get(self, batch_id: str) -> dict[str, Any]:
        """The Batch object; ApiError 404 when no batch has that id (or its record expired)."""
        return self.batch_object(*self._load(batch_id))

    def batch_object(self, record: JobRecord, meta: dict[str, str]) -> dict[str, Any]:
        result = record.result or {}
        counts = result.get("request_counts") or {}
        tokens = result.get("tokens") or {}
        status = derive_status(record)
        finished = _int(record.finished_at)
        errors = None
        if record.state is JobState.FAILED and record.error:
            errors = {"object": "list", "data": [
                {"code": "batch_failed", "message": record.error, "param": None, "line": None}
            ]}  # fmt: skip
        settled = status not in ("validating", "in_progress", "finalizing", "cancelling")
        window = meta.get("completion_window", "24h")
        return {
            "id": f"batch_{record.id}",
            "object": "batch",
            "endpoint": meta.get("endpoint", ""),
            "model": meta.get("model") or None,
            "errors": errors,
            "input_file_id": meta.get("input_file_id", ""),
            "completion_window": window,
            "status": status,
            "output_file_id": self._output_id(record, "out") if settled else None,
            "error_file_id": self._output_id(record, "err") if settled else None,
            "created_at": int(record.created_at),
            "in_progress_at": _int(record.started_at),
            "expires_at": int(record.created_at) + WINDOWS.get(window, 86400),
            "finalizing_at": None,
            "completed_at": finished if status == "completed" else None,
            "failed_at": finished if status == "failed" else None,
            "expired_at": finished if status == "expired" else None,
            "cancelling_at": finished if record.state is JobState.CANCELLED else None,
            "cancelled_at": _int(record.updated_at) if status == "cancelled" else None,
            "request_counts": {
                "total": int(counts.get("total", record.spec.get("requests", 0))),
                "completed": int(counts.get("completed", 0)),
                "failed": int(counts.get("failed", 0)),
            },
            "usage": {
                "input_tokens": int(tokens.get("prompt", 0)),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": int(tokens.get("completion", 0)),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": int(tokens.get("total", 0)),
            },
            "metadata": json.loads(meta.get("metadata") or "{}") or None,
        }

    def page(self, after: str | None, limit: int) -> dict[str, Any]:
        """Batches newest first, `limit` of them after the batch `after` (a cursor)."""
        redis = self.client.redis
        start = 0
        if after is not None:
            match = BATCH_ID.match(after)
            rank = redis.zrevrank(keys.API_BATCHES, match.group(1)) if match else None
            if rank is None:
                raise ApiError(400, f"Invalid 'after': no batch {after!r}.", param="after")
            start = int(rank) + 1  # type: ignore[arg-type,unused-ignore]
        found: list[tuple[JobRecord, dict[str, str]]] = []
        while len(found) <= limit:  # one more than asked: whether there are more
            ids = _texts(redis.zrevrange(keys.API_BATCHES, start, start + limit))
            if not ids:
                break
            start += len(ids)
            for job_id in ids:
                try:
                    found.append(self._load(f"batch_{job_id}"))
                except ApiError:  # its record expired: drop it from the index
                    redis.zrem(keys.API_BATCHES, job_id)
                    start -= 1
                if len(found) > limit:
                    break
        has_more = len(found) > limit
        data = [self.batch_object(*pair) for pair in found[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch that has not ended (a no-op on one cancelling or cancelled); its
        Batch object. ApiError 409 for a batch that has already ended otherwise."""
        record, _ = self._load(batch_id)
        if not Job(record.id, self.client).cancel():
            record, _ = self._load(batch_id)
            if record.state is not JobState.CANCELLED:
                status = derive_status(record)
                raise ApiError(
                    409, f"Cannot cancel a batch with status '{status}'.", param=None,
                    code="batch_not_cancellable",
                )  # fmt: skip
        return self.get(batch_id)

    # --- output files --------------------------------------------------------------------------

    def _output_id(self, record: JobRecord, which: str) -> str | None:
        counts = (record.result or {}).get("request_counts") or {}
        wanted = int(counts.get("completed" if which == "out" else "failed", 0))
        if wanted == 0 or not self._source(record, which).is_file():
            return None
        return f"file-{which}-{record.id}"

    def _source(self, record: JobRecord, which: str) -> Path:
        spec = InferenceSpec.model_validate(record.spec)
        return self.media / (spec.output if which == "out" else spec.errors_output)

    def output_record(self, file_id: str) -> tuple[JobRecord, str] | None:
        """(record, "out"|"err") for an output file id of a settled batch; None for an id of
        another form. ApiError 404 when the batch or the file is gone."""
        match = OUTPUT_ID.match(file_id)
        if match is None:
            return None
        which, job_id = match.groups()
        try:
            record, _ = self._load(f"batch_{job_id}")
        except ApiError:
            raise not_found("File", file_id) from None
        status = derive_status(record)
        if status in ("validating", "in_progress", "finalizing", "cancelling"):
            raise not_found("File", file_id)
        if self._output_id(record, which) != file_id:
            raise not_found("File", file_id)
        return record, which

    def output_path(self, record: JobRecord, which: str) -> Path:
        """The file served for an output id. Errors: the job's errors file. Output: the job's
        output when nothing failed, else its succeeded lines, written once beside it."""
        source = self._source(record, which)
        counts = (record.result or {}).get("request_counts") or {}
        if which == "err" or int(counts.get("failed", 0)) == 0:
            return source
        target = self.media / OUTPUTS_DIR / f"{record.id}.jsonl"
        if target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{time.monotonic_ns()}.writing")
        try:
            with source.open("rb") as lines, temp.open("wb") as out:
                for line in lines:
                    if line.strip() and json.loads(line).get("error") is None:
                        out.write(line)
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)
        return target

    def output_object(self, record: JobRecord, which: str) -> dict[str, Any]:
        path = self.output_path(record, which)
        name = "output" if which == "out" else "errors"
        return file_object(
            f"file-{which}-{record.id}", path.stat().st_size,
            record.finished_at or record.created_at, f"batch_{record.id}_{name}.jsonl",
            "batch_output",
        )  # fmt: skip

    def delete_output(self, record: JobRecord, which: str) -> None:
        """Delete an output file: the job's file itself, and the succeeded-lines copy."""
        self._source(record, which).unlink(missing_ok=True)
        if which == "out":
            (self.media / OUTPUTS_DIR / f"{record.id}.jsonl").unlink(missing_ok=True)

    def output_objects(self) -> list[dict[str, Any]]:
        """The File objects of every settled batch's output files (for `GET /v1/files`)."""
        objects = []
        for job_id in _texts(self.client.redis.zrevrange(keys.API_BATCHES, 0, -1)):
            for which in ("out", "err"):
                try:
                    found = self.output_record(f"file-{which}-{job_id}")
                except ApiError:
                    continue
                if found is not None:
                    objects.append(self.output_object(*found))
        return objects


def _check_urls(path: Path, endpoint: str, file_id: str) -> None:
    """ApiError 400 naming the first line whose url is not the batch's endpoint."""
    with path.open("rb") as handle:
        for number, text in batch_lines(handle, file_id):  # checked at upload: all JSON objects
            url = json.loads(text).get("url")
            if url != endpoint:
                raise ApiError(
                    400,
                    f"Invalid batch file {file_id}: line {number}: url {url!r} does not match "
                    f"the batch's endpoint {endpoint!r}.",
                    param="input_file_id",
                )


def _first_model(path: Path) -> str | None:
    """The model the first request names, shown as the batch's `model`."""
    with path.open("rb") as handle:
        for _, text in batch_lines(handle, str(path)):
            model = json.loads(text).get("body", {}).get("model")
            return model if isinstance(model, str) else None
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: Any) -> list[str]:
    """Members redis-py returned (bytes or str) as text."""
    return [_text(value) for value in values]
