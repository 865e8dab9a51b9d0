"""The submit path, the state index and the per-process lease renewer, on a real Valkey and
real workers: bulk submits, duplicates, priorities at scale, ls and counts from the index."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs import keys, media
from gpujobs.client import Client
from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobKind, JobState
from tests.helpers import WorkerProcess, wait_for


def queued_messages(client: Client, queue: str = "transcode") -> int:
    return sum(int(client.redis.llen(name)) for name in keys.queue_lists(queue))


def test_submit_many_queues_every_item_in_order(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    jobs = client.submit_many(
        [clip, {"input": clip, "output": "out/b.mp4", "height": 90, "priority": 9}]
    )
    assert len({job.id for job in jobs}) == 2
    first, second = (job.status() for job in jobs)
    assert (first.spec["output"], first.spec["priority"]) == ("in/a.480p.mp4", 5)
    assert (second.spec["output"], second.spec["height"], second.spec["priority"]) == (
        "out/b.mp4",
        90,
        9,
    )
    assert queued_messages(client) == 2
    # The priority-9 job sits in the list the Redis transport serves first.
    assert client.redis.llen(keys.queue_lists("transcode")[0]) == 1
    assert [r.id for r in client.list(states=(JobState.QUEUED,))] == [j.id for j in jobs][::-1]


def test_submit_many_checks_everything_before_queueing_anything(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    with pytest.raises(InvalidSpec, match=r"^item 2: input .*missing\.mp4 does not exist$"):
        client.submit_many([clip, clip.with_name("missing.mp4")])
    with pytest.raises(InvalidSpec, match=r"^item 1: unknown setting 'colour'$"):
        client.submit_many([{"input": clip, "colour": "red"}])
    with pytest.raises(InvalidSpec, match=r"^item 1: cq"):
        client.submit_many([{"input": clip, "cq": 99}])
    # Two different jobs, one output: the second would fail, or replace the first's.
    other = media_clip("in/a.mkv", seconds=1, size="320x180")
    with pytest.raises(InvalidSpec, match=r"^output in/a\.480p\.mp4 is the output of both "
                       r"in/a\.mp4 and in/a\.mkv \(give each its own output\)$"):  # fmt: skip
        client.submit_many([clip, other], force=True)
    with pytest.raises(InvalidSpec, match="is the output of both"):
        client.submit_many([{"input": clip, "output": "same.mp4"},
                            {"input": clip, "output": "same.mp4", "cq": 20}])  # fmt: skip
    # Not a list of items: a TypeError that says so, not a path per character.
    for items, words in [("in/a.mp4", "not one str"), ([5], "item 1: must be an input path or "
                         "a mapping, not int"), ({"input": clip}, "not one dict")]:  # fmt: skip
        with pytest.raises(TypeError, match=words):
            client.submit_many(items)  # type: ignore[arg-type]
    assert not client.redis.keys(keys.job("*"))
    assert queued_messages(client) == 0


def test_duplicates_in_one_batch_and_across_batches_return_the_first_job(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    first, again = client.submit_many([clip, clip])
    assert again.id == first.id
    assert client.submit_transcode(clip).id == first.id
    assert client.submit_many([clip], force=True)[0].id != first.id
    assert queued_messages(client) == 2
    # Once the holder has finished, the same input and settings make a new job.
    assert client.store.update(first.id, state=JobState.SUCCEEDED)
    fresh = client.submit_many([clip, clip])
    assert fresh[0].id == fresh[1].id != first.id
    record = client.store.get(fresh[0].id)
    assert record is not None and record.state is JobState.QUEUED
    assert record.spec["input"] == "in/a.mp4" and record.queue == "transcode"
    assert queued_messages(client) == 3


def test_the_state_index_follows_every_change_and_counts_jobs(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    jobs = client.submit_many([{"input": clip, "output": f"o/{i}.mp4"} for i in range(4)])
    store = client.store
    store.update(jobs[1].id, state=JobState.RUNNING)
    store.update(jobs[2].id, state=JobState.RUNNING)
    store.update(jobs[2].id, state=JobState.SUCCEEDED)
    jobs[3].cancel()
    counts = store.counts()
    transcode = {state: counts[(JobKind.TRANSCODE, state)] for state in JobState}
    assert transcode == {
        JobState.QUEUED: 1, JobState.RUNNING: 1, JobState.SUCCEEDED: 1,
        JobState.FAILED: 0, JobState.CANCELLED: 1,
    }  # fmt: skip
    assert [r.id for r in client.list(states=(JobState.RUNNING,))] == [jobs[1].id]
    assert [r.id for r in client.list()] == [j.id for j in reversed(jobs)]
    assert [r.id for r in client.list(limit=2)] == [jobs[3].id, jobs[2].id]
    # A finished record that expired leaves the index when listed, and when pruned.
    client.redis.delete(keys.job(jobs[2].id))
    assert [r.id for r in client.list()] == [jobs[3].id, jobs[1].id, jobs[0].id]
    client.redis.delete(keys.job(jobs[3].id))
    client.redis.zadd(  # as if created longer ago than the record TTL
        keys.state_index("transcode", "cancelled"), {jobs[3].id: 1.0}
    )
    assert store.prune_expired() == 1
    assert store.counts()[(JobKind.TRANSCODE, JobState.CANCELLED)] == 0


def test_metrics_find_node_queues_without_scanning(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    from gpujobs.monitor.metrics import queue_depths, queue_names

    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    prepared = client.prepare_transcode(clip, "o/x.mp4")
    client.enqueue_many([prepared], queue="transcode.node-7.gpu1")
    client.submit_transcode(clip, "o/y.mp4")
    names = queue_names(client.redis)
    assert names == ["inference", "transcode", "transcode.node-7.gpu1"]
    assert queue_depths(client.redis, names) == {
        "inference": 0, "transcode": 1, "transcode.node-7.gpu1": 1,
    }  # fmt: skip


def test_one_renewer_thread_keeps_every_lease_of_a_process(
    client: Client, media_clip: Callable[..., Path]
) -> None:
    from workers.lease import LeaseKeeper, Leases

    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    jobs = client.submit_many([{"input": clip, "output": f"o/{i}.mp4"} for i in range(3)])
    leases = Leases(client.redis, lease_s=2.0)
    claims = [leases.claim(job.id, "w1", "node", "cpu") for job in jobs]
    assert all(claim.claimed for claim in claims)
    before = {t.name for t in threading.enumerate()}
    keepers = [
        LeaseKeeper(leases, job.id, claim.token).__enter__()
        for job, claim in zip(jobs, claims, strict=True)
    ]
    started = {t.name for t in threading.enumerate()} - before
    assert started <= {"gpujobs-leases"}
    # Two lease lifetimes later every lease is still held: renewed, not expired.
    for _ in range(4):
        threading.Event().wait(1.0)
        assert all(client.redis.exists(keys.lease(job.id)) for job in jobs)
    # A lease taken away (the watchdog requeued the job) is reported lost at the next round.
    client.redis.delete(keys.lease(jobs[0].id))
    wait_for(lambda: keepers[0].lost.is_set(), timeout_s=10)
    assert not keepers[1].lost.is_set()
    for keeper in keepers:
        keeper.__exit__(None, None, None)
    assert not any(client.redis.exists(keys.lease(job.id)) for job in jobs)


def test_priority_9_behind_1000_priority_0_jobs_starts_first(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    clip = media_clip("in/a.mp4", seconds=0.5, size="160x90")
    low = client.submit_many(
        [{"input": clip, "output": f"low/{i}.mp4", "priority": 0} for i in range(1000)]
    )
    urgent = client.submit_transcode(clip, "urgent.mp4", priority=9)
    assert queued_messages(client) == 1001
    worker = start_worker()  # one job at a time
    wait_for(
        lambda: client.store.counts()[(JobKind.TRANSCODE, JobState.SUCCEEDED)] >= 2,
        timeout_s=120,
    )
    worker.kill()
    started = client.list(limit=20, states=(JobState.RUNNING, JobState.SUCCEEDED))
    first = min(started, key=lambda record: record.started_at or float("inf"))
    assert first.id == urgent.id
    assert urgent.status().state is JobState.SUCCEEDED
    assert len(low) == 1000


def test_an_unchanged_input_is_read_once_and_a_rewritten_one_again(
    client: Client, media_clip: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input check is remembered per file identity (device, inode, size, times): many
    renditions of one file read its header once; a file written since is read afresh, so a
    good file turned bad (or the reverse) gets the verdict of what it holds now."""
    clip = media_clip("memo/a.mp4", seconds=1, size="320x180")
    good = clip.read_bytes()
    reads: list[Path] = []
    real_check = media.check_input

    def counting(path: Path, demuxer: str | None = None) -> media.MediaInfo:
        reads.append(path)
        return real_check(path, demuxer)

    monkeypatch.setattr(media, "check_input", counting)
    client.submit_many([{"input": clip, "output": f"memo/{h}.mp4", "height": h}
                        for h in (90, 120, 180)])  # fmt: skip
    client.submit_transcode(clip, "memo/240.mp4", height=240)
    assert reads == [clip]
    clip.write_bytes(good[: len(good) // 2])  # an interrupted upload, in place: same inode
    with pytest.raises(InvalidSpec, match=r"the file is incomplete"):
        client.submit_transcode(clip, "memo/360.mp4", height=360)
    clip.write_bytes(good)  # the upload finished
    assert client.submit_transcode(clip, "memo/360.mp4", height=360).status().spec["height"] == 360
    assert reads == [clip, clip, clip]


def test_paths_are_confined_to_the_media_root_through_links(
    client: Client, media_clip: Callable[..., Path], tmp_path: Path
) -> None:
    """Inputs and outputs are judged by where their folders really are (links resolved), as a
    bulk submit checks them (os.path, not pathlib: it must not read `link/..` as `.`)."""
    media = client.settings.media
    clip = media_clip("in/a.mp4", seconds=1, size="320x180")
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "a.mp4").write_bytes(clip.read_bytes())
    (media / "away").symlink_to(outside / "deep")

    # `away/..` is the outside folder, not the media root: the input there is outside.
    for given in ("away/../a.mp4", str(media / "away" / ".." / "a.mp4")):
        with pytest.raises(InvalidSpec, match="is outside the media root"):
            client.prepare_transcode(given, "out/x.mp4")
        copied = client.prepare_transcode(given, "out/x.mp4", copy_outside=True)
        assert copied.copy_from == (outside / "a.mp4").resolve()
        assert copied.spec.input == "inbox/a.mp4"
    with pytest.raises(InvalidSpec, match=r"output away/x\.mp4 is outside the media root"):
        client.prepare_transcode(clip, "away/x.mp4")
    with pytest.raises(InvalidSpec, match=r"must not contain '\.\.'"):
        client.prepare_transcode(clip, "out/../../x.mp4")
    (media / "out" / "dir.mp4").mkdir(parents=True)
    with pytest.raises(InvalidSpec, match=r"output out/dir\.mp4 is a directory"):
        client.prepare_transcode(clip, "out/dir.mp4")
    # A path given the long way round is kept in its plain form.
    prepared = client.prepare_transcode(str(media / "in" / "." / "a.mp4"), "out//./b.mp4")
    assert (prepared.spec.input, prepared.spec.output) == ("in/a.mp4", "out/b.mp4")
    for given in ("in/a.mp4/", "in//a.mp4/.", "./in/a.mp4", str(media / "in" / "a.mp4") + "/"):
        assert client.prepare_transcode(given, "out/c.mp4").spec.input == "in/a.mp4", given
    for blank in ("", "  "):
        with pytest.raises(InvalidSpec, match=r"^input path is empty$"):
            client.prepare_transcode(blank, "out/c.mp4")


def test_a_bulk_submit_reads_new_inputs_together_each_once(
    client: Client, media_clip: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New inputs of a bulk submit are read on worker threads before the items are checked
    (each file once, however often it is named); a bad one is still refused by its item, and
    libav's log level is left as it was."""
    import av.logging

    clips = [media_clip(f"many/{n}.mp4", seconds=1, size="320x180") for n in range(4)]
    broken = clips[2].read_bytes()
    clips[2].write_bytes(broken[: len(broken) // 2])
    reads: list[tuple[Path, str]] = []
    real_check = media.check_input

    def counting(path: Path, demuxer: str | None = None) -> media.MediaInfo:
        reads.append((path, threading.current_thread().name))
        return real_check(path, demuxer)

    monkeypatch.setattr(media, "check_input", counting)
    level = av.logging.get_level()
    items = [{"input": clip, "output": f"many/out{n}-{h}.mp4", "height": h}
             for n, clip in enumerate(clips) for h in (90, 120)]  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"^item 5: input .*2\.mp4: the file is incomplete"):
        client.submit_many(items)
    assert sorted(path for path, _ in reads) == sorted(clips)
    assert all(thread.startswith("gpujobs-probe") for _, thread in reads)
    assert av.logging.get_level() == level
    assert queued_messages(client) == 0
