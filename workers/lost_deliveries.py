"""Deliveries lost with their connection: give them back to their queue.

A worker that takes a message from its queue moves it into kombu's `unacked` hash (indexed by
delivery time in `unacked_index`) until it acknowledges it. When the worker's connection to
Redis drops at that instant (a broker restart), kombu's own restore of the message fails with
the connection, and Redis hands the message out again only after the visibility timeout (12 h
by default, longer than the longest job): the job stays `queued` all that time.

A worker can also lose a message before kombu records it as delivered (the broker goes down
between its BRPOP and the reply): `resend_vanished_messages` sends such a job's message again.

The watchdog calls `restore_lost_deliveries` each round: a transcode message delivered more
than `after_s` seconds ago whose job is still `queued` (never claimed: a claim happens as the
task starts) and that carries no countdown still running goes back to the head of its queue,
out of the unacked hash, through kombu's own `QoS.restore_by_tag`. A copy restored while its
worker was about to start it after all is harmless: the claim runs a job once.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Any

from celery import Celery

from gpujobs import keys
from gpujobs.app import TRANSCODE_QUEUE, TRANSCODE_TASK, broker_priority, task_argsrepr
from gpujobs.specs import JobKind, JobRecord, JobState
from gpujobs.store import JobStore

log = logging.getLogger(__name__)

LOST_AFTER_S = 30.0  # a delivery not claimed this long after it was taken is lost (default)
BATCH = 100  # unacked messages looked at per round, oldest first


def restore_lost_deliveries(
    store: JobStore, app: Celery, after_s: float = LOST_AFTER_S
) -> list[str]:
    """Give each lost transcode delivery back to its queue; the ids of their jobs.

    after_s: seconds since the delivery (kombu's `unacked_index` score, the delivering worker's
    clock) before a message whose job is still queued counts as lost (default 30).
    """
    redis = store.redis
    now = time.time()
    tags: list[Any] = redis.zrangebyscore(
        keys.KOMBU_UNACKED_INDEX, "-inf", now - after_s, start=0, num=BATCH
    )
    if not tags:
        return []
    payloads: list[Any] = redis.hmget(keys.KOMBU_UNACKED, tags)
    lost: list[tuple[Any, str]] = []
    for tag, payload in zip(tags, payloads, strict=True):
        job_id = _lost_job(payload, now - after_s)
        if job_id is not None and _text(redis.hget(keys.job(job_id), "state")) == JobState.QUEUED:
            lost.append((tag, job_id))
    if not lost:
        return []
    with app.connection_for_write() as connection:
        qos = connection.default_channel.qos
        for tag, job_id in lost:
            qos.restore_by_tag(tag, leftmost=True)
            log.warning("job %s: its delivery was lost with its connection; back in its queue",
                        job_id)  # fmt: skip
    return [job_id for _, job_id in lost]


def resend_vanished_messages(
    store: JobStore, app: Celery, after_s: float = LOST_AFTER_S
) -> list[str]:
    """Send again the message of each transcode job queued over `after_s` seconds ago whose
    message is nowhere: in none of its queue's lists, held by no worker (the unacked hash).
    The ids of those jobs.

    A worker's BRPOP takes the message off its list on the server; kombu records the delivery
    in the unacked hash only once the reply arrives. A broker that goes down in between (a
    restart) keeps the pop (its append-only file has it) and the reply is lost: the job stays
    `queued` with no message anywhere, for ever. Seen once in a broker restart under 200
    queued tiny transcodes (tests/test_reliability.py).

    Cheap by construction: only queues whose lists are all empty are looked at (a lost message
    behind a long queue is found once that queue drains: late, never lost), the oldest
    BATCH queued jobs a round. A message resent while its first copy was after all about to be
    recorded is harmless: the claim runs a job once.
    """
    redis = store.redis
    index = keys.state_index(JobKind.TRANSCODE.value, JobState.QUEUED.value)
    members: list[Any] = redis.zrangebyscore(index, "-inf", time.time() - after_s, start=0,
                                             num=BATCH)  # fmt: skip
    candidates = [str(_text(member)) for member in members]
    if not candidates:
        return []
    # Two round trips find the drained queues (most rounds end there: a backlog is no drain);
    # only their jobs' records are read, and the unacked hash only when one is found.
    with redis.pipeline(transaction=False) as pipe:
        for job_id in candidates:
            pipe.hget(keys.job(job_id), "queue")
        queues = [_text(queue) or TRANSCODE_QUEUE for queue in pipe.execute()]
    lists = {queue: keys.queue_lists(queue) for queue in set(queues)}
    with redis.pipeline(transaction=False) as pipe:
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute())
    drained = {queue for queue, names in lists.items() if not sum(next(lengths) for _ in names)}
    suspects = [job for job, queue in zip(candidates, queues, strict=True) if queue in drained]
    if not suspects:
        return []
    held = {_held_job(payload) for payload in redis.hvals(keys.KOMBU_UNACKED)}
    resent = []
    for job_id in suspects:
        record = None if job_id in held else store.get(job_id)
        if record is None or record.state is not JobState.QUEUED:
            continue
        send_transcode(app, record)
        log.warning("job %s: queued with its message gone (taken by a connection that dropped);"
                    " sent again", job_id)  # fmt: skip
        resent.append(job_id)
    return resent


def send_transcode(app: Celery, record: JobRecord, countdown_s: float | None = None) -> None:
    """Publish a transcode job's task message to its queue, at its priority."""
    app.send_task(
        TRANSCODE_TASK, args=[record.id], task_id=record.id,
        queue=record.queue or TRANSCODE_QUEUE, argsrepr=task_argsrepr(record.spec),
        priority=broker_priority(int(record.spec.get("priority", 5))), countdown=countdown_s,
    )  # fmt: skip


def _held_job(payload: Any) -> str | None:
    """The task id of an unacked message (kombu's [message, exchange, routing key])."""
    try:
        job_id = json.loads(payload)[0]["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return job_id if isinstance(job_id, str) else None


def _lost_job(payload: Any, before: float) -> str | None:
    """The job id of an unacked transcode message that should have started before `before`
    (epoch s), or None (another task, a countdown not yet due, or not kombu's shape)."""
    if payload is None:
        return None
    try:
        message, _exchange, _routing_key = json.loads(payload)
        headers = message["headers"]
        if headers.get("task") != TRANSCODE_TASK:
            return None
        eta = headers.get("eta")
        if eta and datetime.fromisoformat(eta).timestamp() > before:
            return None  # held for its countdown (an NVENC wait, a retry's backoff)
        job_id = headers["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return job_id if isinstance(job_id, str) else None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def keep_deliveries_when_the_connection_is_gone() -> None:
    """Stop a lost broker connection from killing the worker (kombu 5.7, Celery 5.7).

    When the connection drops, Celery's consumer closes it, and closing its channel restores
    the messages the worker holds unacknowledged. By then kombu has already detached the
    channel's transport from its connection, so the restore fails reading the connection's host
    (`AttributeError: 'NoneType' object has no attribute 'hostname'`), which Celery does not
    expect there: "Unrecoverable error", and the worker process exits with its jobs. The ack
    of a task that ends in that window fails the same way on the channel's missing connection
    (`'NoneType' object has no attribute 'client'`, from kombu's `Message.ack_log_error`,
    which catches only connection errors), and so does a reject. Seen here in a broker
    restart under 200 queued tiny transcodes (tests/test_reliability.py).

    With this guard such a restore, ack or reject gives up instead, the messages stay in the
    unacked hash, and nothing is lost: a job that was running has a lease (the watchdog
    requeues it when the lease runs out), one that was never claimed is still `queued` and its
    message is given back by `restore_lost_deliveries`, an inference chunk has its own lease;
    one that had ended is delivered again after the visibility timeout and skipped by its
    claim. Idempotent.
    """
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked, "gpujobs_guard", False):
        return
    restore, ack, reject = qos.restore_unacked, qos.ack, qos.reject

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return restore(self, client)
        except AttributeError as exc:
            held = len(self._delivered)
            self._delivered.clear()  # kept in the unacked hash: see above
            log.warning("could not give back %d delivered message(s) on a lost connection (%s);"
                        " they wait in the unacked hash for the watchdog", held, exc)  # fmt: skip
            return None

    def guarded_ack(self: Any, delivery_tag: Any) -> None:
        try:
            ack(self, delivery_tag)
        except AttributeError as exc:
            _gave_up(self, delivery_tag, "acknowledge", exc)

    def guarded_reject(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            reject(self, delivery_tag, requeue)
        except AttributeError as exc:
            _gave_up(self, delivery_tag, "reject", exc)

    guards: list[tuple[str, Any]] = [
        ("restore_unacked", restore_unacked), ("ack", guarded_ack), ("reject", guarded_reject)
    ]  # fmt: skip
    for name, guarded in guards:
        guarded.gpujobs_guard = True
        setattr(qos, name, guarded)


def _gave_up(qos: Any, delivery_tag: Any, what: str, exc: Exception) -> None:
    """Forget a delivery this connection can no longer settle; it waits in the unacked hash."""
    qos._delivered.pop(delivery_tag, None)
    log.warning("could not %s a delivery on a lost connection (%s); it waits in the unacked "
                "hash for the watchdog or the visibility timeout", what, exc)  # fmt: skip
