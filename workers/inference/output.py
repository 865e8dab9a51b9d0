"""A batch's files under the media root: a part file per chunk, then the merged output and
errors files, each written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from gpujobs import keys
from gpujobs.batch import BATCHES, batch_summary
from gpujobs.specs import InferenceSpec, JobRecord, JobState
from gpujobs.store import JobStore
from workers.inference.state import BatchState, ChunkFailed, ChunkRef
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime

log = logging.getLogger(__name__)

# The merge lock's expiry: longer than writing any batch's output takes, so that only a dead
# writer's lock is ever taken over.
MERGE_LOCK_S = 900


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
            if summary["partial"]:
                summary["not_attempted"] = self.spec.requests - completed - failed
            store.update(self.job_id, only_from=(JobState.CANCELLED,), result=summary)
        shutil.rmtree(self.parts, ignore_errors=True)
        log.info("batch %s finished: %s", self.job_id, summary["request_counts"])

    def fail(self, state: BatchState, problem: str) -> bool:
        """Fail the running (or queued) job with `problem`, its partial output written first
        and its counts (`not_attempted` among them) in the same record update, so that whoever
        sees `failed` sees them too. False when the job had already ended."""
        return self._write_partial(state, problem)

    def write_partial(self, state: BatchState) -> bool:
        """The job failed: write its output and errors files again from everything finished
        so far (each chunk that stops because the job failed does, so the last one has every
        finished line), and its counts. False when the job is not failed."""
        return self._write_partial(state, None)

    def _write_partial(self, state: BatchState, problem: str | None) -> bool:
        with self.merging():
            record = self.rt.store.get(self.job_id)
            if record is None:
                return False
            if problem is None and record.state is not JobState.FAILED:
                return False
            if problem is not None and record.state not in (JobState.QUEUED, JobState.RUNNING):
                return False
            stats = state.stats()
            total = stats.get("chunks", 0)
            started = record.started_at
            elapsed = time.time() - started if started else None
            done = len(state.done_chunks())
            summary = batch_summary(self.spec, stats, total, done, elapsed, partial=True)
            fields: dict[str, Any] = {"result": summary}
            if stats.get("completed", 0) + stats.get("failed", 0) > 0:  # else no files
                try:
                    self.write_outputs(state, total)
                    fields["output"] = self.spec.output
                except (OSError, PathOutsideMediaRoot, redis.RedisError) as exc:
                    log.warning("batch %s: no partial output (%s)", self.job_id, exc)
            if problem is None:
                return self.rt.store.update(self.job_id, only_from=(JobState.FAILED,), **fields)
            return self.rt.store.update(
                self.job_id, only_from=(JobState.QUEUED, JobState.RUNNING),
                state=JobState.FAILED, error=problem, eta_s=None, **fields,
            )  # fmt: skip

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
