"""End to end on real parts: a Valkey server, a real worker process, the real ffmpeg."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpujobs.client import Client
from gpujobs.errors import InvalidSpec
from gpujobs.media import probe
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for


def test_transcode_end_to_end_with_live_progress(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = media_clip("in/talk.mp4", seconds=6, size="1280x720")
    progress_event = watch_task_events(client, "task-progress")  # what Flower shows as PROGRESS
    # x264 "slow" (p7): the job runs long enough for Flower's relay to be up and send (a job
    # of a third of a second can end before the relay's first event).
    job = client.submit_transcode(source, height=360, preset="p7")
    # The watch sees the job queued before any worker exists (a worker started first can
    # claim it before a slowed watcher's first read), then every change after.
    watching = job.watch(timeout=120)
    first = next(watching)
    start_worker()
    states = [first.state]
    percents = [first.percent]
    for record in watching:
        states.append(record.state)
        percents.append(record.percent)
    final = job.status()
    assert final.state is JobState.SUCCEEDED, final.error
    assert states[0] is JobState.QUEUED and JobState.RUNNING in states
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert progress_event.wait(60) and progress_event.uuid == job.id
    assert final.worker and final.node and final.attempt == 1 and final.encode_path == "cpu"
    output = client.settings.media / "in" / "talk.360p.mp4"
    info = probe(output)
    assert (info.video_codec, info.width, info.height, info.audio_codec) == (
        "h264",
        640,
        360,
        "aac",
    )
    assert abs(info.duration_s - 6.0) < 0.1
    assert job.result() == final.result
    assert not list(output.parent.glob(".*part*")), "no temporary output may remain"
    # Celery keeps (and Flower's Result column shows) the outcome in one line; the record keeps
    # the whole result.
    assert client.app.AsyncResult(job.id).get(timeout=10) == (
        "in/talk.360p.mp4 | 640x360 h264 | audio aac | 6.0 s | cpu"
    )


def test_a_broken_input_is_refused_at_submit_or_fails_with_the_cause(
    client: Client,
    settings,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Looks like an MP4 to the first bytes, but holds no moov: refused at submit, in words.
    bogus = settings.media / "bogus.mp4"
    bogus.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200)
    with pytest.raises(InvalidSpec, match=r"the file is incomplete \(no moov atom\)$"):
        client.submit_transcode(bogus)
    # A file that turns bad after submit (replaced on the share) fails on the worker.
    source = media_clip("turns-bad.mp4")
    job = client.submit_transcode(source)
    source.write_bytes(bogus.read_bytes())
    start_worker()
    final = job.wait(timeout=60)
    assert final.state is JobState.FAILED
    assert (
        final.error == "cannot read the input turns-bad.mp4: the file is incomplete (no moov atom)"
    )
    assert not (settings.media / "turns-bad.480p.mp4").exists()


class EventSeen(threading.Event):
    uuid: str | None = None


def watch_task_events(client: Client, event_type: str) -> EventSeen:
    """Listen to Celery's task events from a thread; the returned event is set on the first
    `event_type` (its task id in `.uuid`). Returns once the listener is subscribed (kombu's
    fanout is a PSUBSCRIBE: the server's pattern count rises), so no event sent after it is
    missed."""
    seen = EventSeen()
    ready = threading.Event()
    patterns_before = int(client.redis.pubsub_numpat())

    def listen() -> None:
        with client.app.connection() as connection:

            def on_event(event: dict[str, Any]) -> None:
                seen.uuid = event.get("uuid")
                seen.set()
                receiver.should_stop = True

            receiver = client.app.events.Receiver(connection, handlers={event_type: on_event})
            ready.set()
            receiver.capture(limit=None, timeout=600, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    ready.wait(60)
    wait_for(lambda: int(client.redis.pubsub_numpat()) > patterns_before, timeout_s=60)
    return seen


def test_cancel_a_running_job_kills_ffmpeg_and_removes_the_temp_file(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("long.mp4", seconds=30, size="1920x1080")
    worker = start_worker()
    job = client.submit_transcode(source, preset="p7", height=1080)  # slow: x264 "slow" at 1080p
    for record in job.watch(timeout=60):
        if record.state is JobState.RUNNING and record.percent > 0:
            break
    ffmpegs = [
        p for p in psutil.Process(worker.pid).children(recursive=True) if "ffmpeg" in p.name()
    ]
    assert ffmpegs, "ffmpeg should be running"
    revoked = watch_task_events(client, "task-revoked")
    assert job.cancel()
    _, alive = psutil.wait_procs(ffmpegs, timeout=30)
    assert not alive, "ffmpeg must be killed once the job is cancelled"
    assert job.status().state is JobState.CANCELLED
    wait_for(lambda: not list(source.parent.glob(".*part*")), timeout_s=30)
    assert not (source.parent / "long.1080p.mp4").exists()
    # Flower learns it from the worker's events: the task is REVOKED, not SUCCESS.
    assert revoked.wait(30) and revoked.uuid == job.id


def test_cancel_a_queued_job_never_starts_it(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("q.mp4", seconds=2)
    job = client.submit_transcode(source)
    assert job.cancel()
    assert not job.cancel()  # already ended
    follower = client.submit_transcode(source, height=240)
    start_worker()
    assert follower.wait(timeout=60).state is JobState.SUCCEEDED
    record = job.status()
    assert record.state is JobState.CANCELLED and record.started_at is None
    assert not (source.parent / "q.480p.mp4").exists()


def test_priority_serves_urgent_jobs_first(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("p.mp4", seconds=1, size="320x240")
    low = [client.submit_transcode(source, f"low{i}.mp4", height=120, priority=1) for i in range(3)]
    urgent = client.submit_transcode(source, "urgent.mp4", height=120, priority=9)
    start_worker()
    records = [job.wait(timeout=60) for job in [*low, urgent]]
    assert all(r.state is JobState.SUCCEEDED for r in records)
    started = sorted(records, key=lambda r: r.started_at or 0)
    assert started[0].id == urgent.id
