"""Batch inference, producer side: read and check an OpenAI batch file, then queue its chunks.

A batch is the JSONL the OpenAI Batch API and `vllm run-batch` take, one request a line:
`{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`. Every line
is checked before anything is queued, and the first problem is reported in one line that names
the line ("line 7: custom_id 'q3' repeats line 2").

What travels to the workers is a checked copy, `batches/<job id>/requests.jsonl` under the media
root, in which local image paths are rewritten relative to the media root (producers and workers
may mount it at different places). The batch is split into chunks of `chunk_size` requests, one
Celery task each on the `inference` queue, carrying the byte offset of its first line so a worker
reads only its own lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import redis
from pydantic import ValidationError

from gpujobs import keys
from gpujobs.app import INFERENCE_QUEUE, INFERENCE_TASK, broker_priority, chunk_argsrepr
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.jsontext import BOM, FOREIGN_BOMS, json_problem, parse_line
from gpujobs.paths import media_relative
from gpujobs.specs import (
    INFERENCE_URLS,
    InferenceSpec,
    JobKind,
    JobRecord,
    JobState,
    new_job_id,
)

if TYPE_CHECKING:
    from celery import Celery

    from gpujobs.store import JobStore

BATCHES = "batches"  # per-job folder under the media root: the checked requests, part files
REQUESTS_FILE = "requests.jsonl"
# Leading bytes of the image types a vision model takes inline (WebP: RIFF....WEBP, below);
# anything else named by an image_url is refused.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_PASS_THROUGH_SCHEMES = ("http://", "https://", "data:")

Request = dict[str, Any]


def image_mime(path: Path) -> str | None:
    """The image MIME type of a file from its leading bytes; None if it is none we send.

    The bytes decide, not the name: a `.png` that holds text would only fail on the server.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    for magic, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_urls(body: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """The `image_url` objects of a chat body's messages (`{"url": ...}`), in order.

    A bare string `image_url` (some clients send one) is turned into the object form in place.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image = part.get("image_url")
            if isinstance(image, str):
                part["image_url"] = image = {"url": image}
            if isinstance(image, dict) and isinstance(image.get("url"), str):
                yield image


def local_image_path(url: str) -> str | None:
    """The file path an image url names (`file://` or a plain path); None for http(s)/data."""
    if url.startswith(_PASS_THROUGH_SCHEMES):
        return None
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"image url {url!r} names another host")
        return unquote(parts.path)
    if "://" in url:
        raise ValueError(f"image url {url!r} has an unsupported scheme (use http(s), data or file)")
    return url


def _describe(value: object) -> str:
    """A JSON value's kind in words, for messages ("got a list")."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, words in kinds.items():
        if isinstance(value, kind):
            return words
    return "a number" if isinstance(value, int | float) else "an object"


# A request's body field that turns its answer into server-sent events: a batch line holds one
# JSON answer, so such a request is refused (as `vllm run-batch` does).
STREAM_FIELDS = ("stream",)


class BatchChecker:
    """Checks requests one by one; remembers custom_ids to catch repeats.

    media: the producer's media root; local image paths must lie under it and are rewritten
    relative to it.
    """

    def __init__(self, media: Path) -> None:
        self.media = media.resolve()
        self.seen: dict[str, str] = {}  # custom_id -> where it was first seen

    def check(self, raw: object, where: str) -> Request:
        """A checked, normalised copy of one request; InvalidSpec naming `where` if it is bad."""
        try:
            return self._check(raw, where)
        except ValueError as exc:
            raise InvalidSpec(f"{where}: {exc}") from None

    def _check(self, raw: object, where: str) -> Request:
        if not isinstance(raw, dict):
            raise ValueError(f"must be a JSON object, got {_describe(raw)}")
        problem = json_problem(raw)
        if problem:
            raise ValueError(problem)
        custom_id = raw.get("custom_id")
        if custom_id is None:
            raise ValueError("custom_id is missing")
        if not isinstance(custom_id, str) or not custom_id.strip():
            raise ValueError(f"custom_id must be a non-empty string, got {custom_id!r}")
        if custom_id in self.seen:
            raise ValueError(f"custom_id {custom_id!r} repeats {self.seen[custom_id]}")
        method = raw.get("method")
        if method is None:
            raise ValueError("method is missing")
        if method != "POST":
            raise ValueError(f"method {method!r} is not supported (only POST)")
        url = raw.get("url")
        if url is None:
            raise ValueError("url is missing")
        if url not in INFERENCE_URLS:
            raise ValueError(
                f"url {url!r} is not supported (use {', '.join(INFERENCE_URLS[:-1])} "
                f"or {INFERENCE_URLS[-1]})"
            )
        body = raw.get("body")
        if body is None:
            raise ValueError("body is missing")
        if not isinstance(body, dict):
            raise ValueError(f"body must be a JSON object, got {_describe(body)}")
        for flag in STREAM_FIELDS:
            if body.get(flag) not in (None, False):
                raise ValueError(
                    f"a batch request must not stream (body.{flag} is {json.dumps(body[flag])}); "
                    "drop it: each line gets one whole answer"
                )
        for image in image_urls(body):
            image["url"] = self._image(image["url"])
        self.seen[custom_id] = where
        return {"custom_id": custom_id, "method": method, "url": url, "body": body}

    def _image(self, url: str) -> str:
        """A local image's path relative to the media root (other urls unchanged)."""
        local = local_image_path(url)
        if local is None:
            return url
        path = Path(local).expanduser()
        if not path.is_absolute():
            path = self.media / path
        resolved = path.resolve()
        if not resolved.is_relative_to(self.media):
            raise ValueError(f"image {local} is outside the media root {self.media}")
        if not resolved.exists():
            raise ValueError(f"image {local} does not exist")
        if not resolved.is_file():
            raise ValueError(f"image {local} is not a file")
        if image_mime(resolved) is None:
            raise ValueError(f"image {local} is not a PNG, JPEG, GIF, WebP, BMP or TIFF image")
        return resolved.relative_to(self.media).as_posix()


def iter_batch_file(path: Path, media: Path) -> Iterator[Request]:
    """The requests of a batch file, each checked as it is read (InvalidSpec at the first bad
    line). One line is in memory at a time, besides the custom_ids seen so far."""
    shown = str(path)
    if not path.exists():
        raise InvalidSpec(f"batch file {shown} does not exist")
    if not path.is_file():
        raise InvalidSpec(f"batch file {shown} is not a regular file")
    checker = BatchChecker(media)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InvalidSpec(f"batch file {shown} cannot be read: {exc.strerror or exc}") from None
    with handle:
        for number, text in batch_lines(handle, shown):
            try:
                raw = parse_line(text)
            except ValueError as exc:
                raise InvalidSpec(f"line {number}: {exc}") from None
            yield checker.check(raw, f"line {number}")


def batch_lines(handle: BinaryIO, shown: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line of a batch file opened in binary that is not
    blank: a line of whitespace alone (Unicode's too: a no-break space, U+2028) carries
    nothing and is skipped, as vllm run-batch skips it; the UTF-8 byte-order mark is dropped.
    Raises InvalidSpec for a UTF-16/32 file or a line that is not UTF-8. Every reader of a
    batch file goes through here, so they agree on what a line is."""
    for number, raw_line in enumerate(handle, start=1):
        if number == 1:
            for bom, encoding in FOREIGN_BOMS:
                if raw_line.startswith(bom):
                    raise InvalidSpec(
                        f"batch file {shown} is {encoding} text (it starts with a {encoding} "
                        "byte-order mark); save it as UTF-8"
                    )
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidSpec(
                f"line {number}: not UTF-8 text (byte {exc.start + 1} is "
                f"{raw_line[exc.start]:#04x})"
            ) from None
        text = text.lstrip(BOM) if number == 1 else text
        if text.strip():
            yield number, text


def read_batch_file(path: Path, media: Path) -> list[Request]:
    """Every request of a batch file, checked (InvalidSpec at the first bad line)."""
    requests = list(iter_batch_file(path, media))
    if not requests:
        raise InvalidSpec(f"batch file {path} is empty (no requests)")
    return requests


class BatchFile:
    """A batch file's checked requests, read again from the file each time they are iterated,
    so that a batch of any size is checked and written without being held in memory."""

    def __init__(self, path: Path, media: Path) -> None:
        self.path = path
        self.media = media

    def __iter__(self) -> Iterator[Request]:
        return iter_batch_file(self.path, self.media)

    def count(self) -> int:
        """How many requests the file holds, every one checked (InvalidSpec if one is bad)."""
        count = sum(1 for _ in self)
        if not count:
            raise InvalidSpec(f"batch file {self.path} is empty (no requests)")
        return count


def check_request_list(items: Iterable[object], media: Path) -> list[Request]:
    """A list of request dicts given to the SDK, checked; `item N` (1-based) names a bad one."""
    checker = BatchChecker(media)
    requests: list[Request] = []
    for number, item in enumerate(items, start=1):
        where = f"item {number}"
        problem = json_problem(item)
        if problem:
            raise InvalidSpec(f"{where}: {problem}")
        # A deep copy, made as it will travel.
        raw = json.loads(json.dumps(item, ensure_ascii=False, allow_nan=False))
        requests.append(checker.check(raw, where))
    if not requests:
        raise InvalidSpec("the batch is empty (no requests)")
    return requests


@dataclass(frozen=True)
class Chunk:
    """One chunk task's share: `count` requests from index `start`, whose line starts at byte
    `offset` of the requests file."""

    index: int
    start: int
    count: int
    offset: int


@dataclass
class PreparedBatch:
    """A checked batch, ready to write and queue."""

    job_id: str
    spec: InferenceSpec
    # A list (the SDK's dicts) or a BatchFile, which reads and checks the file again when the
    # batch is written: spec.requests is the count.
    requests: Iterable[Request] = field(repr=False)


def spec_defaults(settings: Settings) -> dict[str, Any]:
    """The spec values the settings supply when a caller leaves them out."""
    return {
        "endpoint": settings.vllm_endpoint,
        "max_concurrency": settings.inference_concurrency,
        "adaptive": settings.inference_adaptive,
        "chunk_size": settings.inference_chunk_size,
        "request_timeout_s": settings.inference_request_timeout_s,
        "max_retries": settings.inference_max_retries,
        "server_wait_s": settings.inference_server_wait_s,
    }


def prepare_batch(
    settings: Settings,
    input: str | Path | Iterable[Mapping[str, Any]],
    output: str | Path | None = None,
    **params: Any,
) -> PreparedBatch:
    """Check a batch (a JSONL file, or request dicts) and its parameters; nothing is written.

    input: a path (absolute, or relative to the media root) or an iterable of request dicts.
    output: where results go (absolute or relative to the media root; must lie under it).
    Default: `<stem>.results.jsonl` beside an input under the media root, else
    `batches/<job id>/<stem>.results.jsonl`.
    params: InferenceSpec fields (endpoint, model, max_concurrency, chunk_size, ...).
    Raises InvalidSpec with one line saying what is wrong.
    """
    job_id = new_job_id()
    values = {**spec_defaults(settings), **{k: v for k, v in params.items() if v is not None}}
    stand_in = f"{BATCHES}/{job_id}/{REQUESTS_FILE}"
    # The parameters first, on stand-in paths: a bad --concurrency is reported before the file.
    make_spec({**values, "input": stand_in, "output": "out.jsonl", "requests": 1})
    media = settings.media
    if isinstance(input, str | os.PathLike):
        path = Path(input).expanduser()
        if not path.is_absolute():
            path = media / path
        batch_file = BatchFile(path, media)
        count = batch_file.count()
        requests: Iterable[Request] = batch_file
        source = str(path)
        source_rel = source_relative(path, media)
        stem = path.name.removesuffix(".jsonl")
        resolved = path.resolve()
        under_media = resolved.is_relative_to(media.resolve())
        default_dir = (
            resolved.parent.relative_to(media.resolve()).as_posix()
            if under_media
            else f"{BATCHES}/{job_id}"
        )
    else:
        requests = check_request_list(input, media)
        count = len(requests)
        source = f"{count} request{'' if count == 1 else 's'}"
        source_rel = None
        stem, default_dir = "batch", f"{BATCHES}/{job_id}"
    if output is None:
        output_rel = (PurePosixPath(default_dir) / f"{stem}.results.jsonl").as_posix()
    else:
        output_rel = media_relative(Path(output), media, "output")
    if output_rel == source_rel:
        raise InvalidSpec("output must differ from the input")
    spec = make_spec(
        {**values, "input": stand_in, "output": output_rel, "source": source, "requests": count}
    )
    if spec.errors_output == source_rel:  # rerunning the failed lines into the same output
        raise InvalidSpec(f"the errors file of output {output_rel} would overwrite the input")
    if not spec.overwrite:  # an earlier run's results are never replaced unasked
        for written in (spec.output, spec.errors_output):
            if (media / written).exists():
                raise InvalidSpec(f"output {written} exists (use --overwrite to replace it)")
    return PreparedBatch(job_id=job_id, spec=spec, requests=requests)


def source_relative(source: Path, media: Path) -> str | None:
    """The source file's path relative to the media root, if it lies there."""
    try:
        return source.resolve().relative_to(media.resolve()).as_posix()
    except ValueError:
        return None


def make_spec(values: dict[str, Any]) -> InferenceSpec:
    try:
        return InferenceSpec.model_validate(values)
    except ValidationError as exc:
        raise InvalidSpec.from_validation(exc) from None


def write_requests(
    requests: Iterable[Request], path: Path, chunk_size: int, total: int
) -> list[Chunk]:
    """Write the `total` checked requests as JSONL (temporary name, then rename); the chunk
    plan. InvalidSpec, and nothing left behind, when a file no longer holds what was checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.writing")
    chunks: list[Chunk] = []
    offset = written = 0
    try:
        with partial.open("wb") as handle:
            for index, request in enumerate(requests):
                if index % chunk_size == 0:
                    count = max(0, min(chunk_size, total - index))
                    chunks.append(Chunk(index=len(chunks), start=index, count=count, offset=offset))
                line = json.dumps(
                    request, ensure_ascii=False, allow_nan=False, separators=(",", ":")
                ).encode()
                handle.write(line + b"\n")
                offset += len(line) + 1
                written = index + 1
        if written != total:
            raise InvalidSpec(
                f"the batch changed while it was queued ({written} requests, {total} checked); "
                "submit it again"
            )
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return chunks


def empty_stats() -> dict[str, int]:
    return {"completed": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "total_tokens": 0}  # fmt: skip


def batch_summary(
    spec: InferenceSpec,
    stats: Mapping[str, int],
    chunks: int,
    chunks_done: int,
    elapsed_s: float | None,
    partial: bool = False,
) -> dict[str, Any]:
    """What a batch job's record carries in `result`: counts, rates and where the output goes.

    partial: the job ended before every request finished (cancelled, failed); then
    `not_attempted` counts the requests never sent (or abandoned), apart from the failed ones.

    requests_per_s and tokens_per_s (total tokens, from each response's `usage`) are measured
    from the job's start; completion_tokens_per_s counts generated tokens only.
    """
    done = stats.get("completed", 0) + stats.get("failed", 0)
    rate = (lambda n: round(n / elapsed_s, 2)) if elapsed_s else (lambda n: 0.0)
    summary = {
        "request_counts": {
            "total": spec.requests,
            "completed": stats.get("completed", 0),
            "failed": stats.get("failed", 0),
        },
        "requests_per_s": rate(done),
        "tokens_per_s": rate(stats.get("total_tokens", 0)),
        "completion_tokens_per_s": rate(stats.get("completion_tokens", 0)),
        "tokens": {
            "prompt": stats.get("prompt_tokens", 0),
            "completion": stats.get("completion_tokens", 0),
            "total": stats.get("total_tokens", 0),
        },
        "chunks": {"total": chunks, "done": chunks_done},
        "elapsed_s": round(elapsed_s, 3) if elapsed_s else 0.0,
        "output": spec.output,
        "errors_output": spec.errors_output,
        "partial": partial,
    }
    if partial:  # the job ended early: what it never sent is neither completed nor failed
        summary["not_attempted"] = max(0, spec.requests - done)
    return summary


def stage_batch(prepared: PreparedBatch, settings: Settings) -> list[Chunk]:
    """Write a checked batch's requests file into the media root; its chunk plan.

    InvalidSpec, and nothing left behind, when the file changed since its check.
    """
    spec = prepared.spec
    try:
        return write_requests(
            prepared.requests, settings.media / spec.input, spec.chunk_size, spec.requests
        )
    except BaseException:
        unstage_batch(prepared, settings)
        raise


def unstage_batch(prepared: PreparedBatch, settings: Settings) -> None:
    """Remove what stage_batch wrote (a batch that is not going to be queued)."""
    folder = settings.media / BATCHES / prepared.job_id
    (folder / REQUESTS_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def enqueue_batch(
    prepared: PreparedBatch, *, settings: Settings, store: JobStore, app: Celery
) -> str:
    """Write the checked requests into the media root, record the job and queue its chunks.

    The caller hands over what it holds (a Client's settings, store and app), so this module
    needs nothing from the client. Returns the job id; InvalidSpec when the file changed since
    its check; nothing is left behind when queueing fails.
    """
    return enqueue_batches([prepared], settings=settings, store=store, app=app)[0]


def enqueue_batches(
    prepared: list[PreparedBatch], *, settings: Settings, store: JobStore, app: Celery
) -> list[str]:
    """Queue several checked batches, all or none: every requests file is written (which
    reads each input again) before any job is queued, so a file that fails then leaves
    nothing queued. Returns the job ids in order."""
    staged: list[tuple[PreparedBatch, list[Chunk]]] = []
    try:
        for batch in prepared:
            staged.append((batch, stage_batch(batch, settings)))
    except BaseException:
        for batch, _ in staged:
            unstage_batch(batch, settings)
        raise
    return [_queue_staged(batch, chunks, settings, store, app) for batch, chunks in staged]


def _queue_staged(
    prepared: PreparedBatch, chunks: list[Chunk], settings: Settings, store: JobStore, app: Celery
) -> str:
    spec = prepared.spec
    job_id = prepared.job_id
    ttl = settings.record_ttl_s
    redis_client: redis.Redis = store.redis
    with redis_client.pipeline() as pipe:
        stats = {**empty_stats(), "chunks": len(chunks)}
        pipe.hset(keys.batch_stats(job_id), mapping=stats)  # type: ignore[arg-type,unused-ignore]
        pipe.expire(keys.batch_stats(job_id), ttl)
        pipe.execute()
    record = JobRecord(
        id=job_id,
        kind=JobKind.INFERENCE,
        state=JobState.QUEUED,
        spec=spec.model_dump(mode="json"),
        output=spec.output,
        result=batch_summary(spec, empty_stats(), len(chunks), 0, None),
        created_at=time.time(),
    )
    store.create(record)
    try:
        for chunk in chunks:
            app.send_task(
                INFERENCE_TASK,
                args=[job_id, chunk.index, chunk.start, chunk.count, chunk.offset],
                argsrepr=chunk_argsrepr(job_id, chunk.index, len(chunks), chunk.count),
                task_id=f"{job_id}.{chunk.index}",
                queue=INFERENCE_QUEUE,
                priority=broker_priority(spec.priority),
            )
    except Exception:
        # Never leave a record for a job no queue holds; chunks already sent find no record
        # and are skipped.
        store.delete(job_id)
        redis_client.delete(keys.batch_stats(job_id))
        unstage_batch(prepared, settings)
        raise
    return job_id


def read_stats(client: redis.Redis, job_id: str) -> dict[str, int]:
    """A batch's counters (completed, failed, token counts, chunks) as integers."""
    raw: Mapping[str, str] = client.hgetall(keys.batch_stats(job_id))  # type: ignore[assignment,unused-ignore]
    return {str(name): int(value) for name, value in raw.items()}
