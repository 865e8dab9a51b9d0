"""The job store against a real Valkey server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from gpujobs import keys
from gpujobs.specs import JobKind, JobRecord, JobState
from gpujobs.store import JobStore


@pytest.fixture
def store(broker_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(broker_url, decode_responses=True), record_ttl_s=60)


def new_record(job_id: str, created_at: float) -> JobRecord:
    return JobRecord(
        id=job_id,
        kind=JobKind.TRANSCODE,
        state=JobState.QUEUED,
        spec={"input": f"{job_id}.mp4"},
        created_at=created_at,
    )


def test_update_only_from_allowed_states(store: JobStore) -> None:
    store.create(new_record("a", 1.0))
    assert store.update("a", only_from=(JobState.QUEUED,), state=JobState.RUNNING, worker="w1")
    assert store.update(
        "a", only_from=(JobState.QUEUED, JobState.RUNNING), state=JobState.CANCELLED
    )
    # A late progress update from the worker must not touch a cancelled job.
    assert not store.update("a", only_from=(JobState.RUNNING,), percent=50.0)
    record = store.get("a")
    assert record is not None
    assert (record.state, record.percent, record.worker) == (JobState.CANCELLED, 0.0, "w1")
    assert record.finished_at is not None
    assert 0 < store.redis.ttl(keys.job("a")) <= 60  # finished records expire
    assert not store.update("missing", percent=1.0)


def test_none_deletes_a_field(store: JobStore) -> None:
    store.create(new_record("a", 1.0))
    store.update("a", error="boom")
    store.update("a", error=None)
    record = store.get("a")
    assert record is not None and record.error is None


def test_list_is_newest_first_and_filters(store: JobStore) -> None:
    for i in range(5):
        store.create(new_record(f"j{i}", float(i)))
    store.update("j3", state=JobState.RUNNING)
    assert [r.id for r in store.list(limit=3)] == ["j4", "j3", "j2"]
    assert [r.id for r in store.list(states=[JobState.RUNNING])] == ["j3"]
    store.redis.delete(keys.job("j4"))  # an expired record leaves the index on the next list
    assert [r.id for r in store.list()] == ["j3", "j2", "j1", "j0"]
    assert sum(store.counts().values()) == 4


def test_watch_sees_every_update_live(store: JobStore) -> None:
    store.create(new_record("w", 1.0))

    def work() -> None:
        for percent in (10.0, 50.0, 90.0):
            store.update("w", state=JobState.RUNNING, percent=percent)
        store.update("w", state=JobState.SUCCEEDED, percent=100.0)

    seen: list[tuple[JobState, float]] = []
    started = False
    for record in store.watch(["w"], timeout_s=10):
        seen.append((record.state, record.percent))
        if not started:  # subscribe happens before the first yield: start publishing now
            threading.Thread(target=work).start()
            started = True
    assert seen == [
        (JobState.QUEUED, 0.0), (JobState.RUNNING, 10.0), (JobState.RUNNING, 50.0),
        (JobState.RUNNING, 90.0), (JobState.SUCCEEDED, 100.0),
    ]  # fmt: skip


def test_watch_times_out(store: JobStore) -> None:
    store.create(new_record("slow", 1.0))
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        list(store.watch(["slow"], timeout_s=0.3))
    assert time.monotonic() - began < 2
