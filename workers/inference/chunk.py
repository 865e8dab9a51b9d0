"""The inference chunk task: one chunk of a batch, from its checkpoint to its part file.

One delivery of chunk n of job J:

1. takes the chunk's lease (a redelivery waits while a live worker holds it, so no two workers
   send one chunk at once), then re-reads the record: a finished job is skipped, a cancelled one
   gets its partial output;
2. marks the job running, waits (bounded) for the server, reads its lines from the requests file
   and drops those already checkpointed;
3. sends the rest (workers/inference/client.py); the outcomes that finish together are
   checkpointed in Redis with the batch's counters in one script (workers/inference/state.py)
   before the client awaits again, so a restarted chunk resends nothing that finished and
   counts nothing twice;
4. writes its part file (and its errors part) under a temporary name, marks itself done and drops
   its checkpoint; the delivery that completes the last chunk writes the output and the errors
   file (temporary name, then rename; workers/inference/output.py) and finishes the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, Task

from gpujobs import keys
from gpujobs.app import INFERENCE_QUEUE, INFERENCE_TASK, broker_priority, chunk_argsrepr
from gpujobs.batch import batch_summary
from gpujobs.specs import InferenceSpec, JobRecord, JobState
from gpujobs.store import JobStore
from workers.inference.adaptive import AdaptiveConcurrency
from workers.inference.client import (
    BatchRequest,
    InferenceClient,
    Outcome,
    RetryPolicy,
    ServerUnavailable,
    failure_line,
)
from workers.inference.output import BatchOutput
from workers.inference.state import BatchState, ChunkFailed, ChunkLease, ChunkRef
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime, runtime

log = logging.getLogger(__name__)

STOP_POLL_S = 0.5  # how often a running chunk looks for a cancel, a deadline or a lost lease


def register_inference_task(app: Celery) -> None:
    """Bind the chunk task to `app` under the name producers send (gpujobs.inference_chunk)."""

    @app.task(name=INFERENCE_TASK, bind=True, throws=(ChunkFailed,))  # type: ignore[untyped-decorator,unused-ignore]
    def inference_chunk(
        self: Task, job_id: str, chunk: int, start: int, count: int, offset: int
    ) -> dict[str, Any]:
        ref = ChunkRef(job_id=job_id, index=chunk, start=start, count=count, offset=offset)
        rt = runtime()
        try:
            return run_chunk(rt, ref, worker=self.request.hostname or "worker")
        except ChunkFailed:
            raise  # the job's failure is recorded already
        except Exception as exc:
            # Anything outside per-request handling: a chunk never leaves its job running.
            tries = int(self.request.retries) + 1
            if tries < rt.settings.max_attempts:
                delay = min(60.0, rt.settings.retry_backoff_s * 2 ** (tries - 1))
                log.exception("batch %s chunk %d: try %d failed; again in %g s",
                              job_id, chunk, tries, delay)  # fmt: skip
                # Celery's retry drops the message's argsrepr: keep Flower's chunk label.
                label = getattr(self.request, "argsrepr", None)
                raise self.retry(
                    exc=exc, countdown=delay, max_retries=None, argsrepr=label
                ) from None
            problem = fail_chunk(rt, ref, tries, exc)
            raise ChunkFailed(problem) from exc


def fail_chunk(rt: WorkerRuntime, ref: ChunkRef, tries: int, exc: BaseException) -> str:
    """A chunk failed `tries` times for a reason outside per-request handling: fail the job
    with that reason and write the partial output (everything finished so far). The reason."""
    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
    problem = (
        f"chunk {ref.index} failed {tries} {'time' if tries == 1 else 'times'}; the last: "
        f"{type(exc).__name__}{': ' + detail if detail else ''}"
    )
    fail_job(rt, ref.job_id, problem)
    return problem


def fail_job(rt: WorkerRuntime, job_id: str, problem: str) -> bool:
    """Fail a queued or running batch with `problem` and its partial output (everything that
    finished); False when it had ended already. The failure is recorded even if the output
    cannot be written."""
    try:
        record = rt.store.get(job_id)
        if record is None:
            return False
        spec = InferenceSpec.model_validate(record.spec)
        state = BatchState(rt.store.redis, job_id, rt.settings.record_ttl_s)
        return BatchOutput(rt, spec, job_id).fail(state, problem)
    except Exception:  # the merge lock or Redis: record the failure without the output
        log.exception("batch %s: writing the partial output failed", job_id)
        return rt.store.update(job_id, only_from=(JobState.QUEUED, JobState.RUNNING),
                               state=JobState.FAILED, error=problem, eta_s=None)  # fmt: skip


def write_failed_output(rt: WorkerRuntime, job_id: str) -> None:
    """Add what this chunk finished to a failed batch's partial output; never raises."""
    try:
        record = rt.store.get(job_id)
        if record is None or record.state is not JobState.FAILED:
            return
        spec = InferenceSpec.model_validate(record.spec)
        state = BatchState(rt.store.redis, job_id, rt.settings.record_ttl_s)
        BatchOutput(rt, spec, job_id).write_partial(state)
    except Exception:  # the failure is recorded; a missing partial output must not hide it
        log.exception("batch %s: writing the partial output failed", job_id)


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
    if reason == "ended":  # another chunk failed the job: add what this one finished
        write_failed_output(rt, ref.job_id)
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

    # The outcomes that finished together are checkpointed in one script once the client has
    # handed them all over (before it awaits again): one round trip per group, not per request,
    # and none is left unwritten while the loop waits.
    finished: list[Outcome] = []

    def on_settled() -> None:
        if finished:
            state.checkpoint_many(ref.index, finished)
            finished.clear()
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
        return asyncio.run(
            _send_all(rt, spec, pending, finished.append, should_stop, deadline,
                      reporter.waiting, on_settled)
        )  # fmt: skip
    except ServerUnavailable as exc:
        if fail_job(rt, ref.job_id, str(exc)):
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
    failed = [
        Outcome(request.index, request.custom_id,
                failure_line(request.custom_id, "deadline_exceeded", message), True)
        for request in requests
        if request.index not in finished
    ]  # fmt: skip
    state.checkpoint_many(ref.index, failed)


def ref_ids(ref: ChunkRef) -> tuple[str, int]:
    return ref.job_id, ref.index


async def _send_all(
    rt: WorkerRuntime,
    spec: InferenceSpec,
    pending: list[BatchRequest],
    on_outcome: Any,
    should_stop: Any,
    deadline: float | None,
    on_waiting: Callable[[str | None], None] | None = None,
    on_settled: Callable[[], None] | None = None,
) -> str | None:
    """Wait for the server, then send the pending requests; the reason it stopped, if any.

    While the server is away (before the first request, or gone mid-batch) `on_waiting`
    hears why and for how long it is waited for."""
    settings = rt.settings
    retry = RetryPolicy(
        max_retries=spec.max_retries,
        backoff_s=settings.inference_backoff_s,
        backoff_max_s=settings.inference_backoff_max_s,
    )
    # The key is the worker's (a Secret in its pod), never the spec's: nothing secret is queued.
    api_key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
    async with InferenceClient(
        spec.endpoint, concurrency=spec.max_concurrency, timeout_s=spec.request_timeout_s,
        retry=retry, model=spec.model, resolve_image=image_resolver(rt), api_key=api_key,
        server_wait_s=spec.server_wait_s, on_waiting=on_waiting,
    ) as client:  # fmt: skip
        if deadline is not None and time.time() >= deadline:
            return "deadline"
        if not pending:
            return None
        await client.wait_for_server(spec.server_wait_s)
        if not spec.adaptive:
            return await client.run(
                pending, on_outcome, should_stop, stop_poll_s=STOP_POLL_S, on_settled=on_settled
            )
        # The workers sending to this server share one window of requests in flight.
        adaptive = AdaptiveConcurrency(
            rt.store.redis, client.http, spec.endpoint, start=spec.max_concurrency,
            api_key=client.api_key,
        )  # fmt: skip
        client.on_answer = adaptive.answered
        await adaptive.join(client.slots)  # its share before the first request
        ticking = asyncio.create_task(adaptive.run(client.slots))
        try:
            return await client.run(
                pending, on_outcome, should_stop, stop_poll_s=STOP_POLL_S, on_settled=on_settled
            )
        finally:
            ticking.cancel()
            await asyncio.gather(ticking, return_exceptions=True)


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
        self._waiting: str | None = None

    def waiting(self, message: str | None) -> None:
        """The server is away ("waiting for URL: connection refused, 110 s left"), or back
        (None): shown in the record's result as `waiting` at once."""
        changed = (message is None) != (self._waiting is None)
        self._waiting = message
        if changed:
            self.report()
        else:
            self.maybe_report()

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
        if self._waiting is not None:
            summary["waiting"] = self._waiting
        done = stats.get("completed", 0) + stats.get("failed", 0)
        rate = done / elapsed
        eta = (self.spec.requests - done) / rate if rate > 0 else None
        self.store.update(
            self.state.job_id, only_from=(JobState.RUNNING,),
            percent=round(100.0 * done / self.spec.requests, 1),
            eta_s=None if eta is None else round(eta, 1), result=summary,
        )  # fmt: skip


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
        # Sent as the batch sent it: Flower's arguments label and the batch's priority.
        chunks = int(state.stats().get("chunks", 0)) or index + 1
        app.send_task(
            INFERENCE_TASK, args=ref.task_args(), task_id=f"{job_id}.{index}",
            queue=INFERENCE_QUEUE, argsrepr=chunk_argsrepr(job_id, index, chunks, count),
            priority=broker_priority(int(record.spec.get("priority", 5))),
        )  # fmt: skip
        log.warning(
            "batch %s chunk %d: its worker stopped renewing the lease; resent", *ref_ids(ref)
        )
        resent.append(f"{job_id}.{index}")
    return resent
