"""`--gpu require`: refused at submit when no live worker has a GPU, and otherwise routed to the
queue only GPU workers consume, so a CPU-only worker never takes (and fails) such a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from gpujobs import keys
from gpujobs.app import GPU_TRANSCODE_QUEUE, TRANSCODE_QUEUE
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess
from workers import heartbeat
from workers.gpu.discovery import NO_GPU, Capabilities, GpuInfo
from workers.main import with_node_queue
from workers.supervisor import plan_children

L4 = {"index": 0, "name": "NVIDIA L4",
      "capabilities": {"nvenc": True, "cuda_decode": True, "scale_cuda": True}}  # fmt: skip


def gpu_node_beats(r: redis.Redis) -> None:
    """Another node's heartbeat: it has a GPU worker (so submit takes `require`)."""
    beat = heartbeat.make_heartbeat("gpu-node", [L4], ["gpujobs@gpu-node.gpu0"], [], 0)
    heartbeat.publish(r, beat, ttl_s=300)


def waiting(r: redis.Redis, queue: str) -> list[str]:
    """The job ids of the task messages waiting on `queue`."""
    return [json.loads(m)["headers"]["id"] for name in keys.queue_lists(queue)
            for m in r.lrange(name, 0, -1)]  # fmt: skip


def test_only_workers_with_a_gpu_consume_the_gpu_queue(settings: Settings) -> None:
    gpu = GpuInfo(index=1, uuid="GPU-1", name="NVIDIA L4", memory_total_mb=1, memory_used_mb=0,
                  utilization_pct=0, driver_version="570")  # fmt: skip
    caps = {1: Capabilities(gpu_name="NVIDIA L4", nvenc=True, cuda_decode=True, scale_cuda=True)}
    [on_gpu] = plan_children(settings, [gpu], caps, [TRANSCODE_QUEUE])
    [on_cpu] = plan_children(settings, None, {}, [TRANSCODE_QUEUE])
    assert GPU_TRANSCODE_QUEUE in on_gpu.queues and GPU_TRANSCODE_QUEUE not in on_cpu.queues
    assert on_cpu.caps == NO_GPU
    assert GPU_TRANSCODE_QUEUE in with_node_queue(["transcode"], "n", gpu=True)
    assert GPU_TRANSCODE_QUEUE not in with_node_queue(["transcode"], "n", gpu=False)
    assert with_node_queue(["inference"], "n", gpu=True) == ["inference"]


def test_a_job_requiring_a_gpu_is_queued_where_only_gpu_workers_look(
    client: Client, broker_url: str, media_clip: Callable[..., Path]
) -> None:
    r = redis.Redis.from_url(broker_url)
    clip = media_clip("a.mp4", seconds=1, size="320x240")
    with pytest.raises(InvalidSpec, match="no live worker"):  # no GPU anywhere: refused
        client.submit_transcode(clip, gpu="require")
    with pytest.raises(InvalidSpec, match="item 1: --gpu require: no live worker"):
        client.submit_many([{"input": str(clip), "gpu": "require"}])
    gpu_node_beats(r)
    sdk = client.submit_transcode(clip, gpu="require")
    [many] = client.submit_many([{"input": str(clip), "gpu": "require", "height": 240}])
    cli = subprocess.run(
        [sys.executable, "-m", "gpujobs", "submit", str(clip), "--gpu", "require",
         "--height", "120"],
        capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ),
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    by_cli = cli.stdout.split()[1]
    assert sorted(waiting(r, GPU_TRANSCODE_QUEUE)) == sorted([sdk.id, many.id, by_cli])
    assert waiting(r, TRANSCODE_QUEUE) == []
    assert sdk.status().queue == GPU_TRANSCODE_QUEUE  # a requeue sends it back there


def test_a_ladder_requiring_a_gpu_is_refused_without_one_and_routed_with_one(
    client: Client, broker_url: str, media_clip: Callable[..., Path]
) -> None:
    from gpujobs.ladder import submit_ladder

    clip = media_clip("l.mp4", seconds=1, size="320x240")
    with pytest.raises(InvalidSpec, match="no live worker"):
        submit_ladder(clip, renditions=[240], gpu="require", client=client)
    gpu_node_beats(redis.Redis.from_url(broker_url))
    job = submit_ladder(clip, renditions=[240], gpu="require", client=client)
    assert waiting(redis.Redis.from_url(broker_url), GPU_TRANSCODE_QUEUE) == [job.id]


@pytest.mark.timeout(300)
def test_a_cpu_worker_leaves_a_job_requiring_a_gpu_alone(
    client: Client, broker_url: str, media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    gpu_node_beats(redis.Redis.from_url(broker_url))
    clip = media_clip("c.mp4", seconds=1, size="320x240")
    needs_gpu = client.submit_transcode(clip, gpu="require")  # first in line...
    plain = client.submit_transcode(clip, height=120)  # ...this one behind it
    start_worker("--queues", "transcode")  # no GPU here
    assert plain.wait(timeout=120).state is JobState.SUCCEEDED
    # On the shared queue the CPU worker would have taken it first, and failed it.
    assert needs_gpu.status().state is JobState.QUEUED
