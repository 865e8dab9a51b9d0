"""A job's percent never goes backwards within one attempt, wherever it is shown: `gpujobs watch`
(a watcher that subscribed before reading must not show an update older than what it read), a
split job's record (`status`: its pieces' workers write in any order, and a piece whose worker
died starts again from 0) and Flower. A new attempt starts again, and says so."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gpujobs import keys
from gpujobs.cli.render import JobBars
from gpujobs.client import Client
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import wait_for
from workers.flower_progress import ProgressRelay, progress_text
from workers.lease import Leases
from workers.transcode.split_progress import refresh_parent


def running_job(client: Client, media_clip: Callable[..., Path]) -> str:
    """A transcode job claimed by a (pretend) worker: running, attempt 1, at 0 %."""
    job = client.submit_transcode(media_clip("a.mp4", seconds=1, size="320x240"))
    assert Leases(client.redis).claim(job.id, "w@test", "node", "cpu").claimed
    return job.id


def test_a_watcher_never_shows_an_update_older_than_what_it_read(
    client: Client, media_clip: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = running_job(client, media_clip)
    store = client.store
    read = store.get
    reads: list[str] = []

    def get_after_two_updates(wanted: str) -> JobRecord | None:
        # Between the watcher's SUBSCRIBE and its read, the worker reports twice: the first
        # report (54 %) reaches the watcher's channel after the read showed it the second (88 %).
        reads.append(wanted)
        if reads == [job_id]:
            store.update(job_id, only_from=(JobState.RUNNING,), percent=54.0)
            store.update(job_id, only_from=(JobState.RUNNING,), percent=88.0)
        return read(wanted)

    monkeypatch.setattr(store, "get", get_after_two_updates)
    shown = []
    for record in store.watch([job_id], timeout_s=60):
        shown.append(record.percent)
        if len(shown) == 1:
            store.update(job_id, only_from=(JobState.RUNNING,), percent=95.0)
            store.update(job_id, only_from=(JobState.RUNNING,), state=JobState.SUCCEEDED,
                         percent=100.0)  # fmt: skip
    assert shown[0] == 88.0 and shown[-1] == 100.0
    assert shown == sorted(shown), shown


def test_a_split_jobs_percent_holds_when_a_piece_starts_again(client: Client) -> None:
    def make(job_id: str, state: JobState, **fields: Any) -> None:
        client.store.create(JobRecord(id=job_id, kind=JobKind.TRANSCODE, state=state,
                                      spec={"input": "a.mp4"}, created_at=time.time(),
                                      **fields))  # fmt: skip

    pieces = ["p-p0", "p-p1"]
    make("p", JobState.RUNNING, pieces=pieces, attempt=1)
    make(pieces[0], JobState.RUNNING, parent="p", percent=80.0, attempt=1)
    make(pieces[1], JobState.RUNNING, parent="p", percent=96.0, attempt=1)

    def percent() -> float:
        record = client.store.get("p")
        assert record is not None
        return record.percent

    refresh_parent(client.store, "p")
    assert percent() == 88.0
    # The second piece's worker died: the watchdog requeues it at 0 %, and it starts again.
    assert client.store.update(pieces[1], state=JobState.QUEUED, percent=0.0)
    refresh_parent(client.store, "p")
    assert percent() == 88.0  # the mean is 40 now; the job's percent holds
    client.store.update(pieces[1], state=JobState.RUNNING, percent=30.0)
    client.store.update(pieces[0], state=JobState.SUCCEEDED, percent=100.0)
    refresh_parent(client.store, "p")
    assert percent() == 88.0  # (100 + 30) / 2 = 65: still behind
    client.store.update(pieces[1], percent=90.0)
    refresh_parent(client.store, "p")
    assert percent() == 95.0  # ahead again: it moves


class FakeDispatcher:
    """What the relay sends to Flower, kept here (a real Flower test lives in test_flower)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.arrived = threading.Condition()

    def send(self, event_type: str, **fields: Any) -> None:
        with self.arrived:
            self.sent.append(fields)
            self.arrived.notify_all()

    def close(self) -> None:
        pass


class FakeApp:
    def __init__(self, dispatcher: FakeDispatcher) -> None:
        self.events = type("Events", (), {"Dispatcher": lambda *a, **k: dispatcher})()

    def connection_for_write(self) -> Any:
        return type("Connection", (), {"release": lambda self: None})()


def test_flower_is_never_sent_a_lower_percent_in_one_attempt(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    job_id = running_job(client, media_clip)
    dispatcher = FakeDispatcher()
    relay = ProgressRelay(FakeApp(dispatcher), client.redis, interval_s=0.0)
    watch = relay.follow(job_id, "w@test", job_id)
    channel = keys.job_events(job_id)
    wait_for(lambda: client.redis.pubsub_numsub(channel)[0][1] == 1, timeout_s=30)
    for percent in (88.0, 54.0, 95.0):  # 54: a report that lags behind (see above)
        client.store.update(job_id, only_from=(JobState.RUNNING,), percent=percent)
    with dispatcher.arrived:
        assert dispatcher.arrived.wait_for(
            lambda: any(e["percent"] == 95.0 for e in dispatcher.sent), timeout=30
        ), dispatcher.sent
    relay.end(watch)
    sent = [event["percent"] for event in dispatcher.sent]
    assert sent == sorted(sent) and 54.0 not in sent, sent


def test_a_new_attempt_says_so() -> None:
    record = JobRecord(
        id="aaaaaaaaaaaa", kind=JobKind.TRANSCODE, state=JobState.RUNNING, percent=3.0,
        attempt=2, spec={"input": "in/a.mp4"}, created_at=time.time(),
    )  # fmt: skip
    assert progress_text(record).startswith("attempt 2 | 3.0%")
    assert progress_text(record.model_copy(update={"attempt": 1})).startswith("3.0%")
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    bars = JobBars(console)
    bars.update(record)
    console.print(bars.progress.get_renderable())
    assert "running (attempt 2)" in out.getvalue()
