"""A delivery lost with its connection (the message in kombu's unacked hash, its job never
claimed) goes back to its queue at the watchdog's round, not after the 12 h visibility timeout."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from gpujobs import keys
from gpujobs.app import make_app
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess
from workers.lost_deliveries import restore_lost_deliveries


def take_without_ack(r: redis.Redis, tag: str, taken_s_ago: float) -> dict[str, Any]:
    """Take the one transcode message from its queue as kombu's Redis transport delivers it
    (into the unacked hash and its index, scored by delivery time), and never acknowledge it:
    what a worker whose connection dropped at that instant leaves behind."""
    for name in keys.queue_lists("transcode"):
        raw = r.rpop(name)
        if raw is not None:
            message: dict[str, Any] = json.loads(raw)
            r.hset(keys.KOMBU_UNACKED, tag, json.dumps([message, "", "transcode"]))
            r.zadd(keys.KOMBU_UNACKED_INDEX, {tag: time.time() - taken_s_ago})
            return message
    raise AssertionError("no message queued")


def queued_messages(r: redis.Redis) -> int:
    return sum(int(r.llen(name)) for name in keys.queue_lists("transcode"))  # type: ignore[arg-type]


def test_a_lost_delivery_goes_back_to_its_queue_and_runs(
    client: Client, settings: Settings, media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    r = client.redis
    app = make_app(settings, client.broker_url)
    job = client.submit_transcode(media_clip("lost.mp4", seconds=1, size="320x240"), height=120)
    take_without_ack(r, "tag-lost", taken_s_ago=5)
    # Delivered 5 s ago: not yet counted as lost (30 s by default).
    assert restore_lost_deliveries(client.store, app) == []
    assert queued_messages(r) == 0
    r.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-lost": time.time() - 60})
    assert restore_lost_deliveries(client.store, app) == [job.id]
    assert queued_messages(r) == 1
    assert not r.hexists(keys.KOMBU_UNACKED, "tag-lost")
    assert not r.zscore(keys.KOMBU_UNACKED_INDEX, "tag-lost")
    start_worker()
    record = job.wait(timeout=120)
    assert record.state is JobState.SUCCEEDED and record.attempt == 1, record.error


def test_claimed_jobs_and_countdowns_are_left_alone(
    client: Client, settings: Settings, media_clip: Callable[..., Path],
) -> None:  # fmt: skip
    r = client.redis
    app = make_app(settings, client.broker_url)
    source = media_clip("kept.mp4", seconds=1, size="320x240")
    # A job some worker claimed (running, or over): its message is that worker's to ack.
    running = client.submit_transcode(source, height=120)
    take_without_ack(r, "tag-running", taken_s_ago=600)
    client.store.update(running.id, state=JobState.RUNNING)
    # A message held for its countdown (an NVENC wait, a retry's backoff) that is not yet due.
    waiting = client.submit_transcode(source, height=96)
    message = take_without_ack(r, "tag-countdown", taken_s_ago=600)
    message["headers"]["eta"] = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    r.hset(keys.KOMBU_UNACKED, "tag-countdown", json.dumps([message, "", "transcode"]))
    assert restore_lost_deliveries(client.store, app) == []
    assert r.hlen(keys.KOMBU_UNACKED) == 2 and queued_messages(r) == 0
    assert waiting.status().state is JobState.QUEUED


def test_a_channel_closed_after_its_connection_went_keeps_its_deliveries(broker_url: str) -> None:
    """kombu 5.7: closing the channel of a connection already torn down tries to restore its
    deliveries through that connection and raises AttributeError, which kills a Celery worker.
    With the guard the close completes and the message waits in the unacked hash."""
    from kombu import Connection, Queue

    from workers.lost_deliveries import keep_deliveries_when_the_connection_is_gone

    r = redis.Redis.from_url(broker_url)
    with Connection(broker_url) as connection:
        channel = connection.channel()
        queue = Queue("guard-test", channel=channel)
        queue.declare()
        producer = connection.Producer(channel)
        producer.publish({"n": 1}, routing_key="guard-test", serializer="json")
        message = channel.basic_get("guard-test", no_ack=False)
        assert message is not None and r.hlen(keys.KOMBU_UNACKED) == 1
        # The state Celery's consumer leaves the channel in when the broker drops it.
        channel._pool = None
        channel.connection.client = None
        keep_deliveries_when_the_connection_is_gone()
        keep_deliveries_when_the_connection_is_gone()  # idempotent: wrapped once
        channel.close()  # without the guard: AttributeError ('NoneType' ... 'hostname')
    assert r.hlen(keys.KOMBU_UNACKED) == 1  # kept for the watchdog, not lost


def test_an_ack_on_a_channel_whose_connection_went_keeps_the_delivery(broker_url: str) -> None:
    """kombu 5.7: a task that ends while the broker is down acknowledges through a channel
    whose connection is gone; kombu raises AttributeError ('NoneType' ... 'client') from
    Message.ack_log_error, which only catches connection errors, and the Celery worker exits
    ("Unrecoverable error"). With the guard the ack gives up and the message waits."""
    from kombu import Connection, Queue

    from workers.lost_deliveries import keep_deliveries_when_the_connection_is_gone

    keep_deliveries_when_the_connection_is_gone()
    r = redis.Redis.from_url(broker_url)
    with Connection(broker_url) as connection:
        channel = connection.channel()
        Queue("guard-ack", channel=channel).declare()
        producer = connection.Producer(channel)
        for n in (1, 2):
            producer.publish({"n": n}, routing_key="guard-ack", serializer="json")
        acked, rejected = (channel.basic_get("guard-ack", no_ack=False) for _ in range(2))
        assert acked is not None and rejected is not None and r.hlen(keys.KOMBU_UNACKED) == 2
        # The state a reconnecting consumer leaves the channel in: its connection detached.
        channel._pool = None
        channel.connection = None
        acked.ack_log_error(logging.getLogger("test"), errors=(ConnectionError,))
        rejected.reject()
    assert r.hlen(keys.KOMBU_UNACKED) == 2  # both kept, to be delivered again, not lost


def test_a_message_taken_by_a_dropped_connection_is_sent_again(
    client: Client, settings: Settings, media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    """A BRPOP the broker answered just before it went down: the message is off its list and
    was never recorded as delivered. Once its queue is drained, the job's message is sent
    again; jobs whose message is queued or held by a worker are left alone."""
    from workers.lost_deliveries import resend_vanished_messages

    r = client.redis
    app = make_app(settings, client.broker_url)
    source = media_clip("vanished.mp4", seconds=1, size="320x240")
    vanished = client.submit_transcode(source, height=120)
    for name in keys.queue_lists("transcode"):
        r.delete(name)  # its message: popped, the reply lost with the connection
    waiting = client.submit_transcode(source, height=96)  # its message still queued
    assert resend_vanished_messages(client.store, app, after_s=0) == []  # queue not drained
    take_without_ack(r, "tag-held", taken_s_ago=1)  # `waiting` now held by a worker
    assert resend_vanished_messages(client.store, app, after_s=3600) == []  # not old enough
    assert resend_vanished_messages(client.store, app, after_s=0) == [vanished.id]
    assert queued_messages(r) == 1
    assert waiting.status().state is JobState.QUEUED and r.hlen(keys.KOMBU_UNACKED) == 1
    start_worker()
    record = vanished.wait(timeout=120)
    assert record.state is JobState.SUCCEEDED and record.attempt == 1, record.error
