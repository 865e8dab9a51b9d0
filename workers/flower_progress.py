"""Live progress of a running job in Flower, relayed from the worker as task events.

Flower shows a custom event's type as the task's state but none of its custom fields
(mher/flower#453), so the progress line travels in `result`, a field Flower does show; the final
result replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
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
    """How far a running job is, in one line: `42.0% | 118 fps | 2.10x | eta 12s`; from the
    second attempt on it says so (`attempt 2 | 3.0% | ...`): that attempt started again."""
    parts = [f"attempt {record.attempt}"] if record.attempt > 1 else []
    parts.append(f"{record.percent:.1f}%")
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


class _Watch:
    """One job the relay follows: its task, the last event sent, the update waiting to be."""

    def __init__(self, task_id: str, hostname: str, job_id: str, local: bool = False) -> None:
        self.task_id = task_id
        self.hostname = hostname
        self.job_id = job_id
        self.channel = keys.job_events(job_id)
        self.last_sent = 0.0
        self.pending: JobRecord | None = None
        self.ended = False
        self.furthest: tuple[int, float] = (0, 0.0)  # (attempt, percent) of the latest taken
        # Fed in process (`offer`) by the body that writes the job's progress: no subscription.
        self.local = local

    def take(self, record: JobRecord) -> bool:
        """Keep `record` to send unless it is behind one taken before (an earlier attempt, or
        a lower percent in the same attempt): what Flower shows never goes backwards."""
        if (record.attempt, record.percent) < self.furthest:
            return False
        self.furthest = (record.attempt, record.percent)
        self.pending = record
        return True


class ProgressRelay:
    """The process's one relay: a thread on one pub/sub connection and one event connection,
    following every job the process runs, made on first use and kept for the process's life.

    `follow()` subscribes to a job's channel (through the thread: the pub/sub connection is the
    thread's alone), or with local=True leaves it to the caller to `offer()` each record it
    writes (a plain transcode writes its own progress: no SUBSCRIBE, no UNSUBSCRIBE, no record
    parsed per write); `end()` marks the job ended under the send lock and returns at once, so a
    task's end never waits for the relay, and no progress event of that job is sent after it.
    interval_s: least seconds between two events of one job (default 0.5).
    """

    def __init__(self, app: Any, client: redis.Redis, interval_s: float = 0.5) -> None:
        self.app = app
        self.client = client
        self.interval_s = interval_s
        self._commands: queue.SimpleQueue[tuple[str, _Watch]] = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}  # by channel; the relay thread's alone

    def follow(self, task_id: str, hostname: str, job_id: str, local: bool = False) -> _Watch:
        watch = _Watch(task_id, hostname, job_id, local)
        self._commands.put(("follow", watch))
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gpujobs-flower-progress", daemon=True
                )
                self._thread.start()
        return watch

    def offer(self, watch: _Watch, record: JobRecord) -> None:
        """A record the caller wrote for a followed job: sent like a published one."""
        # Nothing to show before the first progress, as for a published record.
        if record.state is not JobState.RUNNING or record.percent <= 0:
            return
        with self._send_lock:
            if not watch.ended:
                watch.take(record)

    def end(self, watch: _Watch) -> None:
        """The task is ending: drop what is pending. Waits at most for one event in flight."""
        with self._send_lock:
            watch.ended = True
            watch.pending = None
        self._commands.put(("end", watch))

    def _run(self) -> None:
        while True:
            try:
                self._serve()
            except Exception:  # a monitor's failure never fails a job; start over in a moment
                log.warning("progress relay to Flower failed; restarting it", exc_info=True)
                time.sleep(1.0)

    def _serve(self) -> None:
        watches = self._watches
        dispatchers: dict[str, Any] = {}
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        connection = self.app.connection_for_write()
        try:
            channels = [channel for channel, watch in watches.items() if not watch.local]
            if channels:  # starting over after a failure: follow the jobs still running
                pubsub.subscribe(*channels)
            while True:
                self._apply_commands(pubsub, watches, block=not watches)
                message = pubsub.get_message(timeout=0.1) if watches else None
                if message is not None:
                    watch = watches.get(_text(message.get("channel", "")))
                    record = parse_published(message.get("data"))
                    # Nothing to show before the first progress (the claim's 0%), and a job
                    # that fails before it keeps an empty Result column.
                    if (
                        watch is not None
                        and record is not None
                        and record.state is JobState.RUNNING
                        and record.percent > 0
                    ):
                        watch.take(record)
                now = time.monotonic()
                for watch in watches.values():
                    if watch.pending is not None and now - watch.last_sent >= self.interval_s:
                        self._send(connection, dispatchers, watch)
        finally:
            for dispatcher in dispatchers.values():
                with contextlib.suppress(Exception):
                    dispatcher.close()
            with contextlib.suppress(Exception):
                pubsub.close()
            with contextlib.suppress(Exception):
                connection.release()

    def _apply_commands(self, pubsub: Any, watches: dict[str, _Watch], block: bool) -> None:
        try:
            command, watch = self._commands.get(timeout=1.0 if block else 0.0)
        except queue.Empty:
            return
        while True:
            if command == "follow":
                watches[watch.channel] = watch
                if not watch.local:
                    pubsub.subscribe(watch.channel)
            elif watches.get(watch.channel) is watch:
                del watches[watch.channel]
                if not watch.local:
                    pubsub.unsubscribe(watch.channel)
            try:
                command, watch = self._commands.get_nowait()
            except queue.Empty:
                return

    def _send(self, connection: Any, dispatchers: dict[str, Any], watch: _Watch) -> None:
        dispatcher = dispatchers.get(watch.hostname)
        if dispatcher is None:
            dispatcher = self.app.events.Dispatcher(
                connection, hostname=watch.hostname, enabled=True
            )
            dispatchers[watch.hostname] = dispatcher
        with self._send_lock:
            record, watch.pending = watch.pending, None
            if watch.ended or record is None:
                return
            dispatcher.send(
                PROGRESS_EVENT,
                uuid=watch.task_id,
                result=progress_text(record),
                percent=record.percent,
            )
            watch.last_sent = time.monotonic()


_relays: dict[int, ProgressRelay] = {}
_relays_lock = threading.Lock()


def relay_for(app: Any, client: redis.Redis) -> ProgressRelay:
    """This process's relay (made anew in a forked pool child)."""
    with _relays_lock:
        relay = _relays.get(os.getpid())
        if relay is None or relay.client is not client or relay.app is not app:
            relay = _relays[os.getpid()] = ProgressRelay(app, client)
        return relay


class FlowerProgress:
    """Relays one running job's record updates to Flower as `task-progress` events.

    A context manager around a task body. The process's `ProgressRelay` follows the job's
    channel (the store publishes every update there) and sends at most one event per
    `interval_s` seconds (default 0.5). Leaving the block marks the job ended and returns at
    once (no thread is stopped or joined): no progress event is sent after it, so none follows
    the worker's task-succeeded/failed event. A failure here is logged and never fails the job.

    task: the bound Celery task (its app, request.id and request.hostname are used).
    local: the body writes the job's progress itself and hands each record written to
    `offer`; the job's channel is then not followed (default False: it is).
    """

    def __init__(
        self,
        task: Any,
        client: redis.Redis,
        job_id: str,
        interval_s: float = 0.5,
        local: bool = False,
    ) -> None:
        # Celery's task.request is thread-local: read it here, in the task's own thread.
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname
        self.job_id = job_id
        self.relay = relay_for(task.app, client)
        self.relay.interval_s = interval_s
        self.local = local
        self._watch: _Watch | None = None

    def __enter__(self) -> FlowerProgress:
        self._watch = self.relay.follow(self.task_id, self.hostname, self.job_id, self.local)
        return self

    def offer(self, record: JobRecord) -> None:
        """The job's record as the body just wrote it (with local=True); never raises."""
        if self._watch is not None:
            try:
                self.relay.offer(self._watch, record)
            except Exception:  # a monitor's failure never fails a job
                log.warning("progress relay to Flower failed", exc_info=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watch is not None:
            self.relay.end(self._watch)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
