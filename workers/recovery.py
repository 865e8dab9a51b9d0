"""Getting a job that lost its worker running again: requeue, the watchdog, graceful shutdown.

- `requeue()` puts a running job back on its queue as the next attempt, or fails it for good once
  it has used `max_attempts`. It is fenced on the attempt, so a job is requeued once per loss.
- `Watchdog` runs in every worker's main process; each round one of them wins a Redis lock and
  requeues the running jobs whose lease expired (their worker died or stalled).
- `drain_on_shutdown()` runs when a worker is told to stop (SIGTERM): after the grace period it
  requeues what this worker still runs, so the job starts elsewhere at once rather than after the
  lease or the broker's visibility timeout; the task sees its record change and stops ffmpeg.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import redis
from celery import Celery

from gpujobs import keys
from gpujobs.specs import JobKind, JobState
from gpujobs.store import JobStore
from workers.inference.chunk import requeue_expired_chunks
from workers.lost_deliveries import (
    resend_vanished_messages,
    restore_lost_deliveries,
    send_transcode,
)
from workers.transcode.split_progress import fail_parent

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0


def backoff_s(first_s: float, attempt: int) -> float:
    """Delay before retry number `attempt` (1-based): first_s, doubling, at most 60 s."""
    return float(min(first_s * 2 ** max(0, attempt - 1), MAX_BACKOFF_S))


def requeue(
    store: JobStore,
    app: Celery,
    job_id: str,
    attempt: int,
    reason: str,
    max_attempts: int | None,
    countdown_s: float = 0.0,
) -> bool:
    """Requeue attempt `attempt` of a running job (or fail it when attempts are spent).

    max_attempts: None requeues whatever the count (a worker shutting down is not the job's
    fault); countdown_s: seconds before the requeued job may start (retry backoff).

    Returns True when this call moved the job; False when it had moved on already (finished,
    cancelled, or taken by a newer attempt).
    """
    record = store.get(job_id)
    if record is None or record.state is not JobState.RUNNING or record.attempt != attempt:
        return False
    entry = {"attempt": attempt, "worker": record.worker, "started_at": record.started_at,
             "ended_at": time.time(), "reason": reason}  # fmt: skip
    # Each history entry is written with the state change it describes (one script).
    if max_attempts is not None and attempt >= max_attempts:
        failed = store.update(
            job_id, only_from=(JobState.RUNNING,), attempt=attempt, state=JobState.FAILED,
            error=f"gave up after {attempt} attempts; last: {reason}", eta_s=None,
            history={**entry, "outcome": "failed"},
        )  # fmt: skip
        if failed and record.parent is not None:  # a split job's piece: its parent fails now
            piece = store.get(job_id)
            if piece is not None:
                fail_parent(store, piece)
        return failed
    moved = store.update(
        job_id, only_from=(JobState.RUNNING,), attempt=attempt, state=JobState.QUEUED,
        error=f"attempt {attempt} ended: {reason}; requeued", percent=0.0, eta_s=None,
        fps=None, speed=None, history={**entry, "outcome": "requeued"},
    )  # fmt: skip
    if not moved:  # (when it moved, the store's script dropped the lease with the change)
        return False
    if record.kind is JobKind.TRANSCODE:
        send_transcode(app, record, countdown_s or None)
    log.warning("job %s attempt %d requeued: %s", job_id, attempt, reason)
    return True


def expired_leases(store: JobStore) -> list[str]:
    """Job ids whose lease expiry (server time) has passed and whose lease key is gone."""
    seconds, micros = store.redis.time()
    now = seconds + micros / 1_000_000
    members = store.redis.zrangebyscore(keys.LEASES, "-inf", now)
    return [str(job_id) for job_id in members if not store.redis.exists(keys.lease(str(job_id)))]


class Watchdog:
    """A thread that, once per `interval_s`, requeues running jobs whose lease expired, resends
    expired inference chunks, gives deliveries lost with their connection back to their queue
    and sends again the messages a dropped connection took (workers/lost_deliveries.py).

    Every worker runs one; a Redis lock (SET NX PX) lets one of them win each round.
    """

    def __init__(self, store: JobStore, app: Celery, interval_s: float, max_attempts: int) -> None:
        self.store = store
        self.app = app
        self.interval_s = interval_s
        self.max_attempts = max_attempts
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpujobs-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_round()
            except Exception:  # a failed round must never kill the worker; the next one retries
                log.exception("watchdog round failed")

    def run_round(self) -> list[str]:
        """One round; the ids of the jobs it requeued or failed, and "job.chunk" for each batch
        chunk it resent (empty when it lost the lock)."""
        lock_ms = max(1, int(self.interval_s * 1000 * 0.9))
        if not self.store.redis.set(keys.WATCHDOG_LOCK, self.token, nx=True, px=lock_ms):
            return []
        moved = []
        for job_id in expired_leases(self.store):
            record = self.store.get(job_id)
            if record is None or record.state is not JobState.RUNNING:
                self.store.redis.zrem(keys.LEASES, job_id)
                continue
            reason = f"worker {record.worker} stopped renewing its lease"
            if requeue(self.store, self.app, job_id, record.attempt, reason, self.max_attempts):
                moved.append(job_id)
            self.store.redis.zrem(keys.LEASES, job_id)
        moved += requeue_expired_chunks(self.store, self.app, self.max_attempts)
        moved += restore_lost_deliveries(self.store, self.app)
        moved += resend_vanished_messages(self.store, self.app)
        return moved


def drain_on_shutdown(
    store: JobStore,
    app: Celery,
    running_job_ids: Callable[[], Iterable[str]],
    worker: str,
    grace_s: float,
) -> threading.Thread:
    """Start a thread that waits `grace_s` seconds, then requeues this worker's jobs still
    running. If they all finish sooner the worker exits first and this thread with it."""

    def drain() -> None:
        threading.Event().wait(grace_s)
        for job_id in running_job_ids():
            try:
                record = store.get(job_id)
                if record is None or record.worker != worker:
                    continue
                requeue(
                    store,
                    app,
                    job_id,
                    record.attempt,
                    f"worker {worker} shut down",
                    max_attempts=None,
                )
            except redis.RedisError:
                log.exception("could not requeue %s on shutdown; its lease will expire", job_id)

    thread = threading.Thread(target=drain, name="gpujobs-drain", daemon=True)
    thread.start()
    return thread
