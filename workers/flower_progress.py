"""Live progress of a running job in Flower, relayed from the worker as task events.

Flower shows a custom event's type as the task's state but none of its custom fields
(mher/flower#453), so the progress line travels in `result`, a field Flower does show; the final
result replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import Any

import redis

from gpujobs import keys
from gpujobs.specs import JobRecord, JobState
from gpujobs.store import parse_published

log = logging.getLogger(__name__)

# Custom task event carrying a running job's progress; Flower shows its type as state PROGRESS.
PROGRESS_EVENT = "task-progress"


def progress_text(record: JobRecord) -> str:
    """How far a running job is, in one line: `42.0% | 118 fps | 2.10x | eta 12s`."""
    parts = [f"{record.percent:.1f}%"]
    if record.fps:
        parts.append(f"{record.fps:.0f} fps")
    if record.speed:
        parts.append(f"{record.speed:.2f}x")
    if record.eta_s is not None:
        parts.append(f"eta {record.eta_s:.0f}s")
    if record.node:
        where = "cpu" if record.gpu in (None, "cpu") else f"gpu {record.gpu}"
        parts.append(f"on {record.node} {where}")
    return " | ".join(parts)


class FlowerProgress:
    """Relays one running job's record updates to Flower as `task-progress` events.

    A context manager around a task body: a thread subscribes to the job's channel (the store
    publishes every update there) and sends at most one event per `interval_s` seconds (default
    0.5) on its own broker connection. Leaving the block stops the thread before the task returns,
    so every progress event is sent before the worker's task-succeeded/failed event. A failure
    here is logged and never fails the job.

    task: the bound Celery task (its app, request.id and request.hostname are used).
    """

    def __init__(
        self, task: Any, client: redis.Redis, job_id: str, interval_s: float = 0.5
    ) -> None:
        self.app = task.app
        # Celery's task.request is thread-local: read it here, in the task's own thread.
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname
        self.client = client
        self.job_id = job_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FlowerProgress:
        try:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            # Subscribe before the body runs, so no update of this job falls before the relay.
            pubsub.subscribe(keys.job_events(self.job_id))
        except (redis.RedisError, OSError) as exc:
            log.warning("job %s: no progress in Flower: %s", self.job_id, exc)
            return self
        self._thread = threading.Thread(
            target=self._relay, args=(pubsub,), name=f"flower-progress-{self.job_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _relay(self, pubsub: Any) -> None:
        app = self.app
        try:
            with app.connection_for_write() as connection:
                dispatcher = app.events.Dispatcher(connection, hostname=self.hostname, enabled=True)
                last_sent = 0.0
                pending: JobRecord | None = None
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None:
                        record = parse_published(message.get("data"))
                        # Nothing to show before the first progress (the claim's 0%), and
                        # a job that fails before it keeps an empty Result column.
                        if (
                            record is not None
                            and record.state is JobState.RUNNING
                            and record.percent > 0
                        ):
                            pending = record
                    if pending is not None and time.monotonic() - last_sent >= self.interval_s:
                        dispatcher.send(
                            PROGRESS_EVENT,
                            uuid=self.task_id,
                            result=progress_text(pending),
                            percent=pending.percent,
                        )
                        last_sent = time.monotonic()
                        pending = None
                dispatcher.close()
        except Exception:  # a monitor's failure never fails the job
            log.warning("job %s: progress relay to Flower stopped", self.job_id, exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
