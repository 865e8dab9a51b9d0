"""The inference chunk task: one chunk of a batch, from its checkpoint to its part file.

One delivery of chunk n of job J:

1. takes the chunk's lease (a redelivery waits while a live worker holds it, so no two workers
   send one chunk at once), then re-reads the record: a finished job is skipped, a cancelled one
   gets its partial output;
2. marks the job running, waits (bounded) for the server, reads its lines from the requests file
   and drops those already checkpointed;
3. sends the rest (workers/inference/client.py); each outcome is checkpointed in Redis together
   with the batch's counters in one script, so a restarted chunk resends nothing that finished
   and counts nothing twice;
4. writes its part file (and its errors part) under a temporary name, marks itself done and drops
   its checkpoint; the delivery that completes the last chunk writes the output and the errors
   file (temporary name, then rename) and finishes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task

from gpujobs import keys
from gpujobs.app import INFERENCE_QUEUE, INFERENCE_TASK
from gpujobs.batch import BATCHES, batch_summary
from gpujobs.specs import InferenceSpec, JobRecord, JobState
from gpujobs.store import JobStore
from workers.inference.client import (
    BatchRequest,
    InferenceClient,
    Outcome,
    RetryPolicy,
    ServerUnavailable,
    failure_line,
)
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime, runtime

log = logging.getLogger(__name__)

STOP_POLL_S = 0.5  # how often a running chunk looks for a cancel, a deadline or a lost lease
LEASE_POLL_S = 0.5  # how often a redelivered chunk looks whether the live holder let go
# The merge lock's expiry: longer than writing any batch's output takes, so that only a dead
# writer's lock is ever taken over.
MERGE_LOCK_S = 900

# KEYS: checkpoint hash, stats hash. ARGV: index, line, "completed"|"failed", prompt tokens,
# completion tokens, total tokens, ttl seconds. 1 when new; 0 when already checkpointed (and
# then nothing is counted: a request counts once however often its chunk runs). Both keys live
# ttl seconds from the latest checkpoint (a counter re-made by HINCRBY would never expire).
_CHECKPOINT_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'total_tokens', ARGV[6])
return 1
"""

# KEYS: done set, stats hash. ARGV: chunk, ttl seconds. Returns {added, chunks done, chunks}.
_MARK_DONE_LUA = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local total = tonumber(redis.call('HGET', KEYS[2], 'chunks') or '0')
return {added, redis.call('SCARD', KEYS[1]), total}
"""

# Chunk leases are also kept in keys.CHUNK_LEASES (member: the chunk's task arguments as JSON,
# score: expiry by the server's clock), so the watchdog can resend a dead worker's chunk.
# KEYS: lease, chunk leases. ARGV: token, lease ms, member. Takes a free lease (1), else 0.
_TAKE_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + ARGV[2] / 1000, ARGV[3])
return 1
"""

# KEYS: lease, chunk leases. ARGV: token, lease ms, member. Renews if `token` holds it (1), else 0.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + ARGV[2] / 1000, ARGV[3])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: lease, chunk leases. ARGV: token, member. Drops the lease if `token` holds it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ChunkFailed(Exception):
    """Raised after the job's failure is recorded, so Celery (and Flower) show the reason."""


@dataclass(frozen=True)
class ChunkRef:
    """Chunk `index` of job `job_id`: `count` requests from `start`, at byte `offset`."""

    job_id: str
    index: int
    start: int
    count: int
    offset: int

    def task_args(self) -> list[Any]:
        """The arguments of the chunk's Celery task (gpujobs.inference_chunk)."""
        return [self.job_id, self.index, self.start, self.count, self.offset]

    @property
    def lease_member(self) -> str:
        """The chunk as a member of keys.CHUNK_LEASES: its task arguments as JSON."""
        return json.dumps(self.task_args(), separators=(",", ":"))


class BatchState:
    """A batch's Redis state: checkpoints, counters, finished chunks, chunk leases.

    ttl_s: seconds every key lives (the record's TTL), so an abandoned batch leaves nothing.
    """

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: int) -> None:
        self.redis = client
        self.job_id = job_id
        self.ttl_s = ttl_s
        self._checkpoint = client.register_script(_CHECKPOINT_LUA)
        self._mark_done = client.register_script(_MARK_DONE_LUA)
        self._take = client.register_script(_TAKE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def checkpoint(self, chunk: int, outcome: Outcome) -> bool:
        """Record a finished request and count it; False when it was recorded before."""
        line = json.dumps(outcome.line, ensure_ascii=False, separators=(",", ":"))
        usage = outcome.usage
        added = self._checkpoint(
            keys=[keys.batch_checkpoint(self.job_id, chunk), keys.batch_stats(self.job_id)],
            args=[outcome.index, line, "failed" if outcome.failed else "completed",
                  usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                  usage.get("total_tokens", 0), self.ttl_s],
        )  # fmt: skip
        return bool(added)

    def finished(self, chunk: int) -> dict[int, str]:
        """Request index -> output line of the chunk's checkpointed requests."""
        raw: dict[str, str] = self.redis.hgetall(keys.batch_checkpoint(self.job_id, chunk))  # type: ignore[assignment]
        return {int(index): line for index, line in raw.items()}

    def finished_indexes(self, chunk: int) -> set[int]:
        raw: list[str] = self.redis.hkeys(keys.batch_checkpoint(self.job_id, chunk))  # type: ignore[assignment]
        return {int(index) for index in raw}

    def drop_checkpoint(self, chunk: int) -> None:
        self.redis.delete(keys.batch_checkpoint(self.job_id, chunk))

    def stats(self) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(keys.batch_stats(self.job_id))  # type: ignore[assignment]
        return {name: int(value) for name, value in raw.items()}

    def done_chunks(self) -> set[int]:
        raw: set[str] = self.redis.smembers(keys.batch_done(self.job_id))  # type: ignore[assignment]
        return {int(chunk) for chunk in raw}

    def mark_done(self, chunk: int) -> tuple[bool, int, int]:
        """Mark a chunk's part file written: (newly marked, chunks done, chunks in all)."""
        added, done, total = self._mark_done(
            keys=[keys.batch_done(self.job_id), keys.batch_stats(self.job_id)],
            args=[chunk, self.ttl_s],
        )
        return bool(added), int(done), int(total)

    def take_lease(self, ref: ChunkRef, token: str, lease_s: float) -> bool:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        return bool(
            self._take(keys=lease_keys, args=[token, int(lease_s * 1000), ref.lease_member])
        )

    def renew_lease(self, ref: ChunkRef, token: str, lease_s: float) -> bool:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        return bool(
            self._renew(keys=lease_keys, args=[token, int(lease_s * 1000), ref.lease_member])
        )

    def release_lease(self, ref: ChunkRef, token: str) -> None:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        self._release(keys=lease_keys, args=[token, ref.lease_member])


class ChunkLease:
    """Holds one chunk's lease while the chunk runs, renewing it every third of `lease_s` from
    a thread; `lost` is set when another holder took it (ours expired while we stalled)."""

    def __init__(self, state: BatchState, ref: ChunkRef, lease_s: float) -> None:
        self.state = state
        self.ref = ref
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="chunk-lease", daemon=True)

    def acquire(self, give_up: Any) -> bool:
        """Take the lease, waiting while a live holder has it; False when `give_up()` says so
        first (the chunk got done, the job ended)."""
        while not self.state.take_lease(self.ref, self.token, self.lease_s):
            if give_up():
                return False
            # A holder renews its lease while it lives; no event marks its death, so we look.
            time.sleep(LEASE_POLL_S)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.state.renew_lease(self.ref, self.token, self.lease_s):
                    self.lost.set()
                    return
            except redis.RedisError:
                continue  # the broker dropped for a moment; the lease has slack for a retry

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            self.state.release_lease(self.ref, self.token)


def register_inference_task(app: Celery) -> None:
    """Bind the chunk task to `app` under the name producers send (gpujobs.inference_chunk)."""

    @app.task(name=INFERENCE_TASK, bind=True)  # type: ignore[untyped-decorator]
    def inference_chunk(
        self: Task, job_id: str, chunk: int, start: int, count: int, offset: int
    ) -> dict[str, Any]:
        ref = ChunkRef(job_id=job_id, index=chunk, start=start, count=count, offset=offset)
        return run_chunk(runtime(), ref, worker=self.request.hostname or "worker")


def run_chunk(rt: WorkerRuntime, ref: ChunkRef, worker: str) -> dict[str, Any]:
    """Run one delivery of one chunk (see the module's docstring). Returns a small summary."""
    store = rt.store
    state = BatchState(store.redis, ref.job_id, rt.settings.record_ttl_s)

    def give_up() -> bool:
        if ref.index in state.done_chunks():
            return True
        record = store.get(ref.job_id)
        # Not for a cancelled job: its chunk must still be settled into the partial output, by
        # the live holder or, once a dead one's lease expires, by this delivery.
        return record is None or record.state in (JobState.SUCCEEDED, JobState.FAILED)

    lease = ChunkLease(state, ref, rt.settings.inference_lease_s)
    if not lease.acquire(give_up):
        return {"skipped": "done elsewhere"}
    try:
        return _run_leased(rt, store, state, ref, worker, lease)
    finally:
        lease.release()


def _run_leased(
    rt: WorkerRuntime,
    store: JobStore,
    state: BatchState,
    ref: ChunkRef,
    worker: str,
    lease: ChunkLease,
) -> dict[str, Any]:
    record = store.get(ref.job_id)
    if record is None:
        log.warning("batch %s has no record (expired?); chunk %d skipped", ref.job_id, ref.index)
        return {"skipped": "no record"}
    spec = InferenceSpec.model_validate(record.spec)
    output = BatchOutput(rt, spec, ref.job_id)
    if record.state is JobState.CANCELLED:
        output.settle_cancelled(state, ref)
        return {"skipped": "cancelled"}
    if record.state.terminal:
        return {"skipped": record.state.value}
    if ref.index in state.done_chunks():
        # A redelivery after the part was written: the job may still wait for its output.
        _, done, total = state.mark_done(ref.index)
        if done == total:
            output.finish(state, store)
        return {"skipped": "done"}
    record = _mark_running(rt, store, ref, worker)
    if record is None or record.state is not JobState.RUNNING:  # cancelled or ended meanwhile
        if record is not None and record.state is JobState.CANCELLED:
            output.settle_cancelled(state, ref)
        return {"skipped": record.state.value if record else "no record"}
    try:
        requests = read_chunk(rt.media_path(spec.input), ref)
    except (OSError, ValueError, KeyError, PathOutsideMediaRoot) as exc:
        problem = f"cannot read the batch's requests ({spec.input}): {exc}"
        store.update(ref.job_id, only_from=(JobState.RUNNING,), state=JobState.FAILED,
                     error=problem, eta_s=None)  # fmt: skip
        raise ChunkFailed(problem) from None
    finished = state.finished_indexes(ref.index)
    pending = [request for request in requests if request.index not in finished]
    reporter = Reporter(store, state, spec, record, rt.settings.progress_interval_s)
    log.info("batch %s chunk %d: %d requests, %d to send", ref.job_id, ref.index,
             len(requests), len(pending))  # fmt: skip
    reason = _send_chunk(rt, state, ref, spec, record, lease, reporter, pending)
    if reason in (None, "deadline") and not state.renew_lease(ref, lease.token, lease.lease_s):
        reason = "lease lost"  # it lapsed unnoticed: the new holder's checkpoint must stay
    if reason == "lease lost":
        log.warning("batch %s chunk %d: lease lost; another delivery goes on", *ref_ids(ref))
        return {"stopped": "lease lost"}
    if reason == "ended":  # another chunk failed the job (its server never came up)
        return {"stopped": "job ended"}
    if reason == "cancelled":
        output.settle_cancelled(state, ref)
        return {"stopped": "cancelled"}
    if reason == "deadline":
        _fail_unfinished(state, ref, spec, requests)
    lines = state.finished(ref.index)
    missing = [r.custom_id for r in requests if r.index not in lines]
    if missing:  # cannot happen while the checkpoint lives; say so loudly rather than lose them
        raise RuntimeError(f"chunk {ref.index} lost {len(missing)} requests: {missing[:3]}")
    output.write_part(ref.index, lines)
    _, done, total = state.mark_done(ref.index)
    state.drop_checkpoint(ref.index)
    reporter.report()
    if done == total:
        output.finish(state, store)
    return {"chunk": ref.index, "sent": len(pending), "requests": len(requests)}


def _send_chunk(
    rt: WorkerRuntime,
    state: BatchState,
    ref: ChunkRef,
    spec: InferenceSpec,
    record: JobRecord,
    lease: ChunkLease,
    reporter: Reporter,
    pending: list[BatchRequest],
) -> str | None:
    """Send the chunk's pending requests, checkpointing each as it finishes; why sending
    stopped early (lease lost, deadline, cancelled, ended), or None when all are done.

    A server that never comes up fails the job (ChunkFailed), unless it had ended already.
    """
    store = rt.store
    deadline = record.created_at + spec.deadline_s if spec.deadline_s else None

    def on_outcome(outcome: Outcome) -> None:
        state.checkpoint(ref.index, outcome)
        reporter.maybe_report()

    def should_stop() -> str | None:
        if lease.lost.is_set():
            return "lease lost"
        if deadline is not None and time.time() >= deadline:
            return "deadline"
        current = store.get(ref.job_id)
        if current is None or current.state is not JobState.RUNNING:
            return "cancelled" if current and current.state is JobState.CANCELLED else "ended"
        reporter.maybe_report()
        return None

    try:
        return asyncio.run(_send_all(rt, spec, pending, on_outcome, should_stop, deadline))
    except ServerUnavailable as exc:
        failed = store.update(
            ref.job_id, only_from=(JobState.RUNNING,), state=JobState.FAILED, error=str(exc),
            eta_s=None,
        )  # fmt: skip
        if failed:
            raise ChunkFailed(str(exc)) from None
        current = store.get(ref.job_id)  # another chunk failed it first, or it was cancelled
        cancelled = current is not None and current.state is JobState.CANCELLED
        return "cancelled" if cancelled else "ended"


def _mark_running(
    rt: WorkerRuntime, store: JobStore, ref: ChunkRef, worker: str
) -> JobRecord | None:
    """Move the job to running; its record, read again (it may be cancelled or ended by now).

    The first chunk to start moves the job to running (and stamps its start); the record shows
    the worker of the latest chunk to start.
    """
    store.update(
        ref.job_id, only_from=(JobState.QUEUED,), state=JobState.RUNNING,
        started_at=time.time(), percent=0.0,
    )  # fmt: skip
    store.update(ref.job_id, only_from=(JobState.RUNNING,), worker=worker,
                 node=rt.settings.node_name)  # fmt: skip
    return store.get(ref.job_id)


def _fail_unfinished(
    state: BatchState, ref: ChunkRef, spec: InferenceSpec, requests: list[BatchRequest]
) -> None:
    """The deadline passed: checkpoint every request of the chunk not finished as failed."""
    finished = state.finished_indexes(ref.index)
    message = f"the batch's deadline ({spec.deadline_s:g} s) passed before it finished"
    for request in requests:
        if request.index not in finished:
            line = failure_line(request.custom_id, "deadline_exceeded", message)
            state.checkpoint(ref.index, Outcome(request.index, request.custom_id, line, True))


def ref_ids(ref: ChunkRef) -> tuple[str, int]:
    return ref.job_id, ref.index


async def _send_all(
    rt: WorkerRuntime,
    spec: InferenceSpec,
    pending: list[BatchRequest],
    on_outcome: Any,
    should_stop: Any,
    deadline: float | None,
) -> str | None:
    """Wait for the server, then send the pending requests; the reason it stopped, if any."""
    settings = rt.settings
    retry = RetryPolicy(
        max_retries=spec.max_retries,
        backoff_s=settings.inference_backoff_s,
        backoff_max_s=settings.inference_backoff_max_s,
    )
    async with InferenceClient(
        spec.endpoint, concurrency=spec.max_concurrency, timeout_s=spec.request_timeout_s,
        retry=retry, model=spec.model, resolve_image=image_resolver(rt),
    ) as client:  # fmt: skip
        if deadline is not None and time.time() >= deadline:
            return "deadline"
        if not pending:
            return None
        await client.wait_for_server(spec.server_wait_s)
        return await client.run(pending, on_outcome, should_stop, stop_poll_s=STOP_POLL_S)


def image_resolver(rt: WorkerRuntime) -> Callable[[str], Path]:
    """rt.media_path for a request's local images, with a path that escapes the media root (a
    symlink put in since the batch was checked, say) a ValueError: that request fails alone."""

    def resolve(path: str) -> Path:
        try:
            return rt.media_path(path)
        except PathOutsideMediaRoot as exc:
            raise ValueError(f"image {exc}") from None

    return resolve


def read_chunk(path: Path, ref: ChunkRef) -> list[BatchRequest]:
    """The chunk's requests, read from its byte offset in the checked requests file."""
    requests = []
    with path.open("rb") as handle:
        handle.seek(ref.offset)
        for position in range(ref.count):
            raw = json.loads(handle.readline())
            requests.append(
                BatchRequest(ref.start + position, raw["custom_id"], raw["url"], raw["body"])
            )
    return requests


class Reporter:
    """Puts the batch's counters and rates into the job record, at most once per
    `progress_interval_s` (a few updates a second however many requests finish)."""

    def __init__(
        self,
        store: JobStore,
        state: BatchState,
        spec: InferenceSpec,
        record: JobRecord,
        interval_s: float = 0.25,
    ) -> None:
        self.store = store
        self.state = state
        self.spec = spec
        self.started_at = record.started_at or time.time()
        self.interval_s = interval_s
        self._last = 0.0

    def maybe_report(self) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self.report()

    def report(self) -> None:
        self._last = time.monotonic()
        stats = self.state.stats()
        elapsed = max(1e-6, time.time() - self.started_at)
        summary = batch_summary(
            self.spec, stats, stats.get("chunks", 0), len(self.state.done_chunks()), elapsed
        )
        done = stats.get("completed", 0) + stats.get("failed", 0)
        rate = done / elapsed
        eta = (self.spec.requests - done) / rate if rate > 0 else None
        self.store.update(
            self.state.job_id, only_from=(JobState.RUNNING,),
            percent=round(100.0 * done / self.spec.requests, 1),
            eta_s=None if eta is None else round(eta, 1), result=summary,
        )  # fmt: skip


class BatchOutput:
    """A batch's files under the media root: part files per chunk, the output and errors file."""

    def __init__(self, rt: WorkerRuntime, spec: InferenceSpec, job_id: str) -> None:
        self.rt = rt
        self.spec = spec
        self.job_id = job_id
        self.parts = rt.media_path(f"{BATCHES}/{job_id}/parts")

    def part(self, chunk: int, errors: bool = False) -> Path:
        return self.parts / f"{chunk:06d}{'.errors' if errors else ''}.jsonl"

    def write_part(self, chunk: int, lines: dict[int, str]) -> None:
        """The chunk's lines in input order, and its failed lines apart."""
        ordered = [lines[index] for index in sorted(lines)]
        failed = [line for line in ordered if json.loads(line).get("error") is not None]
        _write_atomic(self.part(chunk), ordered)
        _write_atomic(self.part(chunk, errors=True), failed)

    def _lines(self, state: BatchState, chunks: int, errors: bool) -> Iterator[str]:
        """Every finished line in input order: from part files, else from checkpoints."""
        for chunk in range(chunks):
            part = self.part(chunk, errors)
            if part.exists():
                with part.open(encoding="utf-8") as handle:
                    yield from (line.rstrip("\n") for line in handle)
                continue
            finished = state.finished(chunk)
            for index in sorted(finished):
                line = finished[index]
                if not errors or json.loads(line).get("error") is not None:
                    yield line

    def write_outputs(self, state: BatchState, chunks: int) -> None:
        _write_atomic(self.rt.media_path(self.spec.output), self._lines(state, chunks, False))
        _write_atomic(self.rt.media_path(self.spec.errors_output), self._lines(state, chunks, True))

    @contextlib.contextmanager
    def merging(self) -> Iterator[None]:
        """Hold the batch's merge lock: one worker at a time writes the output from the parts."""
        lock = self.rt.store.redis.lock(
            keys.batch_merge(self.job_id), timeout=MERGE_LOCK_S, blocking_timeout=MERGE_LOCK_S
        )
        if not lock.acquire():
            raise RuntimeError(f"batch {self.job_id}: merge lock held for {MERGE_LOCK_S} s")
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError):  # else it expires by itself
                lock.release()

    def finish(self, state: BatchState, store: JobStore) -> None:
        """Every chunk is done: write the output and errors files, then finish the job.

        Under the merge lock, and only once: a second delivery that saw the last chunk done
        (a redelivery, or the watchdog's resend after the first finisher died) finds the job
        finished and writes nothing, so the parts are never read after they are removed.
        """
        with self.merging():
            record = store.get(self.job_id)
            if record is None or record.state in (JobState.SUCCEEDED, JobState.FAILED):
                return
            if record.state is JobState.CANCELLED and not self.parts.exists():
                return  # the cancelled batch's output was written whole already
            self._finish(state, store, record)

    def _finish(self, state: BatchState, store: JobStore, record: JobRecord) -> None:
        stats = state.stats()
        chunks = stats.get("chunks", 0)
        try:
            self.write_outputs(state, chunks)
        except (OSError, PathOutsideMediaRoot) as exc:  # else the job would stay running
            problem = f"cannot write the batch's output {self.spec.output}: {exc}"
            store.update(self.job_id, only_from=(JobState.RUNNING,), state=JobState.FAILED,
                         error=problem, eta_s=None)  # fmt: skip
            raise ChunkFailed(problem) from None
        started = record.started_at or time.time()
        elapsed = max(1e-6, time.time() - started)
        summary = batch_summary(self.spec, stats, chunks, chunks, elapsed)
        completed, failed = stats.get("completed", 0), stats.get("failed", 0)
        fields: dict[str, Any] = {"state": JobState.SUCCEEDED}
        if completed == 0 and failed > 0:
            first = next(self._lines(state, chunks, errors=True), "{}")
            error = json.loads(first).get("error") or {}
            fields = {
                "state": JobState.FAILED,
                "error": f"all {failed} requests failed; the first: "
                f"{error.get('code')}: {error.get('message')}",
            }
        finished = store.update(
            self.job_id, only_from=(JobState.RUNNING,), percent=100.0, eta_s=0,
            output=self.spec.output, result=summary, **fields,
        )  # fmt: skip
        if not finished:  # cancelled: the output holds everything that finished
            summary["partial"] = completed + failed < self.spec.requests
            store.update(self.job_id, only_from=(JobState.CANCELLED,), result=summary)
        shutil.rmtree(self.parts, ignore_errors=True)
        log.info("batch %s finished: %s", self.job_id, summary["request_counts"])

    def settle_cancelled(self, state: BatchState, ref: ChunkRef) -> None:
        """The job was cancelled: keep what this chunk finished as its part, and rewrite the
        partial output from everything finished so far. Every settling chunk does, one at a
        time under the merge lock and each after its part is marked, so the last to write has
        every part; the one that finds every chunk settled removes the parts."""
        if ref.index in state.done_chunks():
            return
        self.write_part(ref.index, state.finished(ref.index))
        added, _, total = state.mark_done(ref.index)
        if not added:
            return
        state.drop_checkpoint(ref.index)
        with self.merging():
            if not self.parts.exists():
                return  # every chunk was settled and the output written whole already
            done = len(state.done_chunks())
            self.write_outputs(state, total)
            stats = state.stats()
            record = self.rt.store.get(self.job_id)
            started = record.started_at if record else None
            elapsed = time.time() - started if started else None
            summary = batch_summary(self.spec, stats, total, done, elapsed, partial=True)
            self.rt.store.update(self.job_id, only_from=(JobState.CANCELLED,), result=summary)
            if done == total:
                shutil.rmtree(self.parts, ignore_errors=True)


def _write_atomic(path: Path, lines: Iterator[str] | list[str]) -> None:
    """Write lines under a temporary name unique to this writer, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.writing")
    try:
        with temp.open("w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
                handle.write("\n")
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)


def requeue_expired_chunks(store: JobStore, app: Celery, max_attempts: int) -> list[str]:
    """Resend the chunks whose lease expired (their worker died) to the inference queue.

    Called from the watchdog's round (one winner per round). A chunk of a finished job, or one
    already done, is dropped; a chunk that lost its worker `max_attempts` times fails its job.
    Returns "job.chunk" for each chunk resent.
    """
    seconds, micros = store.redis.time()
    now = seconds + micros / 1_000_000
    resent = []
    for raw in store.redis.zrangebyscore(keys.CHUNK_LEASES, "-inf", now):
        member = str(raw)
        job_id, index, start, count, offset = json.loads(member)
        ref = ChunkRef(job_id=job_id, index=index, start=start, count=count, offset=offset)
        if store.redis.exists(keys.batch_lease(job_id, index)):
            continue  # renewed since the scan began
        store.redis.zrem(keys.CHUNK_LEASES, member)
        record = store.get(job_id)
        # A cancelled batch's chunks still settle into its partial output, so they go on too.
        if record is None or record.state in (JobState.SUCCEEDED, JobState.FAILED):
            continue
        state = BatchState(store.redis, job_id, store.record_ttl_s)
        done = state.done_chunks()
        # A done chunk's worker died after writing its part. Once every chunk is done and the
        # job still runs, that worker was the one to write the output: resend it to do so.
        if index in done and (
            record.state is JobState.CANCELLED or len(done) < state.stats().get("chunks", 0)
        ):
            continue
        lost = int(store.redis.hincrby(keys.batch_requeues(job_id), str(index), 1))
        store.redis.expire(keys.batch_requeues(job_id), store.record_ttl_s)
        if lost >= max_attempts:
            store.update(job_id, only_from=(JobState.QUEUED, JobState.RUNNING),
                         state=JobState.FAILED, error=f"chunk {index} lost its worker {lost} "
                         "times")  # fmt: skip
            continue
        app.send_task(INFERENCE_TASK, args=ref.task_args(), task_id=f"{job_id}.{index}",
                      queue=INFERENCE_QUEUE)  # fmt: skip
        log.warning(
            "batch %s chunk %d: its worker stopped renewing the lease; resent", *ref_ids(ref)
        )
        resent.append(f"{job_id}.{index}")
    return resent
