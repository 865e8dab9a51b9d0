"""The NVENC session semaphore on a real Valkey: contention, leases, a killed holder, and a job
that finds no slot waiting in its queue instead of failing."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
import redis

from gpujobs import keys
from gpujobs.client import Client
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for
from workers.gpu.nvenc import NoNvencSlot, NvencSemaphore

FAKE_BIN = Path(__file__).parent / "fake_bin"
NODE = "node-nvenc"
# fork: a contender starts in milliseconds (spawn would re-import the test module 20 times).
FORK = multiprocessing.get_context("fork")


def contend(url: str, name: str, limit: int, hold_s: float) -> None:
    """One job: wait for a slot (bounded), count holders while holding it, give it back."""
    client = redis.Redis.from_url(url)
    slots = NvencSemaphore(client, NODE, limit=limit, lease_s=10)
    deadline = time.monotonic() + 60
    while not slots.try_acquire(name):
        if time.monotonic() > deadline:
            raise SystemExit(3)
        time.sleep(0.005)  # contending as fast as a busy worker pool would, without spinning
    try:
        client.rpush("test:holders-seen", client.incr("test:holders"))
        time.sleep(hold_s)  # the "encode"
        client.decr("test:holders")
    finally:
        slots.release(name)
    client.rpush("test:done", name)


def hold_forever(url: str, lease_s: float, ready: EventType) -> None:
    """A worker that takes a slot and keeps renewing it until it is killed."""
    slots = NvencSemaphore(redis.Redis.from_url(url), NODE, limit=1, lease_s=lease_s)
    with slots.slot("doomed"):
        ready.set()
        while True:
            time.sleep(60)


def test_twenty_jobs_never_hold_more_than_three_slots(broker_url: str) -> None:
    procs = [FORK.Process(target=contend, args=(broker_url, f"job-{n}", 3, 0.5)) for n in range(20)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * 20
    r = redis.Redis.from_url(broker_url, decode_responses=True)
    seen = [int(n) for n in r.lrange("test:holders-seen", 0, -1)]
    assert r.llen("test:done") == 20
    assert max(seen) <= 3, f"more than 3 holders at once: {seen}"
    assert max(seen) == 3, "20 jobs on 3 slots should have filled them"
    assert NvencSemaphore(r, NODE, limit=3).in_use() == 0


def test_a_killed_holders_slot_comes_back_after_its_lease(broker_url: str) -> None:
    lease_s = 2.0  # renewed every lease_s / 3: a loaded machine still renews in time
    ready = FORK.Event()
    holder = FORK.Process(target=hold_forever, args=(broker_url, lease_s, ready), daemon=True)
    holder.start()
    assert ready.wait(10)
    slots = NvencSemaphore(redis.Redis.from_url(broker_url), NODE, limit=1, lease_s=lease_s)
    assert not slots.try_acquire("other")
    # Past one lease the live holder still has it: its renewals keep it.
    time.sleep(lease_s * 1.5)
    assert not slots.try_acquire("other")
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()
    holder.join(5)
    wait_for(lambda: slots.try_acquire("other"), timeout_s=lease_s * 10)
    # Back once the lease runs out, not at some later cleanup (bound generous for a busy host).
    assert time.monotonic() - killed <= lease_s * 3


def test_slot_raises_when_full_and_releases_on_exit(broker_url: str) -> None:
    slots = NvencSemaphore(redis.Redis.from_url(broker_url), NODE, limit=1, lease_s=5)
    with slots.slot("a"):
        assert slots.in_use() == 1
        with pytest.raises(NoNvencSlot), slots.slot("b"):
            pass
    assert slots.in_use() == 0
    assert slots.try_acquire("b")


def test_an_expired_holder_cannot_renew_past_the_limit(broker_url: str) -> None:
    slots = NvencSemaphore(redis.Redis.from_url(broker_url), NODE, limit=1, lease_s=0.2)
    assert slots.try_acquire("stalled")
    time.sleep(0.3)  # the lease runs out with no renewal: a stalled holder
    assert slots.try_acquire("fresh")
    assert not slots.renew("stalled")
    assert slots.in_use() == 1


@pytest.mark.parametrize("limit", [0, None])
def test_no_limit_for_datacenter_cards_touches_nothing(broker_url: str, limit: int | None) -> None:
    r = redis.Redis.from_url(broker_url)
    slots = NvencSemaphore(r, NODE, limit=limit)
    with slots.slot("a"), slots.slot("b"):
        pass
    assert not r.exists(keys.nvenc_slots(NODE))


def test_an_nvenc_job_with_no_free_slot_waits_queued_then_runs(
    client: Client, media_clip: Callable[..., Path], start_worker: Callable[..., WorkerProcess],
    ffmpeg: str, broker_url: str,
) -> None:  # fmt: skip
    """The worker believes its GPU has NVENC (measured capabilities handed over as the
    supervisor does) and runs a stand-in ffmpeg that encodes on the CPU."""
    node = client.settings.node_name
    slots = NvencSemaphore(redis.Redis.from_url(broker_url), node, limit=1, lease_s=60)
    assert slots.try_acquire("another-encode")  # the node's only session is taken
    source = media_clip("nv.mp4", seconds=1, size="320x240")
    start_worker(env={
        "GPUJOBS_MEASURED_CAPABILITIES":
            '{"gpu_name": "stand-in", "nvenc": true, "cuda_decode": true, "scale_cuda": true}',
        "GPUJOBS_FFMPEG": str(FAKE_BIN / "ffmpeg-gpu-standin"),
        "REAL_FFMPEG": ffmpeg,
        "GPUJOBS_NVENC_SESSIONS": "1",
        "GPUJOBS_NVENC_WAIT_S": "0.3",
    })  # fmt: skip
    job = client.submit_transcode(source, height=120)
    states = []
    with pytest.raises(TimeoutError):
        for record in job.watch(timeout=2.0):  # several retries' worth of waiting
            states.append(record.state)
    assert set(states) == {JobState.QUEUED}, "no slot: the job must neither run nor fail"
    assert job.status().attempt == 0
    slots.release("another-encode")
    final = job.wait(timeout=60)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.encode_path == "nvenc" and final.attempt == 1
    # The slot goes back when the task returns, just after the record says succeeded.
    wait_for(lambda: slots.in_use() == 0, timeout_s=30)
