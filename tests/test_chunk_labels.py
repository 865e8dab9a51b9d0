"""A batch chunk reads as such in Flower on every send, not only the first: the watchdog's resend
of a chunk whose worker died, and Celery's retry of a chunk that failed outside per-request
handling, carry the `batch ID chunk i/n: N requests` label and the batch's priority."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from gpujobs import keys
from gpujobs.app import chunk_argsrepr
from gpujobs.client import Client
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for
from workers.inference.chunk import requeue_expired_chunks
from workers.inference.state import ChunkRef

ROWS = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"input": f"text {i}"}} for i in range(120)]  # fmt: skip


def waiting_messages(r: redis.Redis, queue: str = "inference") -> list[dict[str, Any]]:
    """The task messages waiting on `queue` (every priority list)."""
    return [json.loads(m) for name in keys.queue_lists(queue) for m in r.lrange(name, 0, -1)]


def held_messages(r: redis.Redis) -> list[dict[str, Any]]:
    """The messages a worker holds unacknowledged (kombu's Redis transport keeps each in its
    `unacked` hash as [message, exchange, routing key]), e.g. a retry waiting for its ETA."""
    return [json.loads(raw)[0] for raw in r.hvals("unacked")]


def test_a_chunk_resent_by_the_watchdog_keeps_its_label_and_priority(
    client: Client, broker_url: str
) -> None:
    batch = client.submit_inference(
        ROWS, endpoint="http://127.0.0.1:9/v1", chunk_size=50, priority=8
    )
    r = redis.Redis.from_url(broker_url)
    [first] = [m for m in waiting_messages(r) if m["headers"]["id"] == f"{batch.id}.1"]
    r.delete(*keys.queue_lists("inference"))  # a worker took every chunk...
    args = json.loads(base64.b64decode(first["body"]))[0]
    ref = ChunkRef(job_id=args[0], index=args[1], start=args[2], count=args[3], offset=args[4])
    r.zadd(keys.CHUNK_LEASES, {ref.lease_member: 0})  # ...and died holding chunk 2's lease
    resent = requeue_expired_chunks(client.store, client.app, max_attempts=3)
    assert resent == [f"{batch.id}.1"]
    [again] = waiting_messages(r)
    assert again["headers"]["argsrepr"] == f"batch {batch.id} chunk 2/3: 50 requests"
    assert again["headers"]["argsrepr"] == first["headers"]["argsrepr"]
    assert again["properties"]["priority"] == first["properties"]["priority"] == 1


@pytest.mark.timeout(300)
def test_a_chunk_retried_by_celery_keeps_its_label(
    client: Client, broker_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    batch = client.submit_inference(ROWS[:10], endpoint="http://127.0.0.1:9/v1", chunk_size=50)
    # A spec the worker cannot read fails the chunk outside per-request handling: retried.
    assert client.store.update(batch.id, spec={"requests": "garbled"})
    retry_waits = {"GPUJOBS_RETRY_BACKOFF_S": "600"}  # the retried message waits, held
    worker = start_worker("--queues", "inference", env=retry_waits)
    r = redis.Redis.from_url(broker_url)

    def retried() -> list[dict[str, Any]]:
        every = waiting_messages(r) + held_messages(r)
        return [m for m in every if m["headers"]["id"] == f"{batch.id}.0"
                and m["headers"]["retries"] == 1]  # fmt: skip

    [again] = wait_for(retried, timeout_s=120)
    assert again["headers"]["argsrepr"] == chunk_argsrepr(batch.id, 0, 1, 10), worker.log()
    assert batch.status().state is JobState.QUEUED
