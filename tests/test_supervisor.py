"""The supervisor for real: a stand-in nvidia-smi reporting 4 GPUs, 4 real Celery worker
processes each pinned to one GPU and consuming its own queue, routing to a GPU, restarts, warm
shutdown; and the bad input that must fail before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis

from gpujobs import keys
from gpujobs.client import Client
from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for
from workers.supervisor import STOP_TIMEOUT_S

FAKE_BIN = Path(__file__).parent / "fake_bin"
NODE = "node-1"
HEARTBEAT_SHAPE = {"node", "ts", "gpus", "workers", "running_jobs", "nvenc_slots_in_use"}
GPU_SHAPE = {"index", "uuid", "name", "memory_total_mb", "memory_used_mb", "utilization_pct",
             "capabilities"}  # fmt: skip


def fake_env(gpus: int = 4) -> dict[str, str]:
    return {
        "PATH": f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}",
        "FAKE_GPUS": str(gpus),
        "GPUJOBS_NODE_NAME": NODE,
        "GPUJOBS_HEARTBEAT_INTERVAL_S": "0.5",
        "GPUJOBS_HEARTBEAT_TTL_S": "10",
    }


def heartbeat(broker_url: str) -> dict[str, object]:
    raw = redis.Redis.from_url(broker_url).get(keys.heartbeat(NODE))
    return json.loads(raw) if raw else {}


def children(pid: int) -> dict[str, psutil.Process]:
    """The supervisor's worker processes by CUDA_VISIBLE_DEVICES."""
    found = {}
    for proc in psutil.Process(pid).children():
        try:
            found[proc.environ()["CUDA_VISIBLE_DEVICES"]] = proc
        except (psutil.NoSuchProcess, KeyError):
            continue
    return found


@pytest.mark.timeout(400)
def test_one_pinned_worker_per_gpu_each_on_its_own_queue(
    client: Client, broker_url: str, media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    supervisor = start_worker("--gpus", "all", env=fake_env(4))
    hostnames = [f"gpujobs@{NODE}.gpu{i}" for i in range(4)]
    # Every child reports once Celery says it is ready; the heartbeat lists the ready ones.
    wait_for(lambda: heartbeat(broker_url).get("workers") == hostnames, timeout_s=90)

    # Four Celery worker processes, each seeing one GPU, each named after it.
    pinned = children(supervisor.pid)
    assert sorted(pinned) == ["0", "1", "2", "3"]
    for index, proc in pinned.items():
        cmdline = proc.cmdline()
        assert cmdline[cmdline.index("--hostname") + 1] == f"gpujobs@{NODE}.gpu{index}"
        assert proc.environ()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"

    # Each consumes the shared queue, its node's, its own GPU's and that of the jobs requiring a
    # GPU (asked of Celery itself).
    def every_reply() -> dict[str, list[dict[str, str]]] | None:
        inspect = client.app.control.inspect(destination=hostnames, timeout=5)
        replies = inspect.active_queues() or {}
        return replies if sorted(replies) == hostnames else None  # a busy worker answers late

    replies = wait_for(every_reply, timeout_s=60)
    for index in range(4):
        names = {queue["name"] for queue in replies[f"gpujobs@{NODE}.gpu{index}"]}
        assert names == {"transcode", f"transcode.{NODE}", f"transcode.{NODE}.gpu{index}",
                         "transcode-gpu"}  # fmt: skip

    # The heartbeat has the shape the exporter reads; the stand-in GPU cannot encode.
    beat = heartbeat(broker_url)
    assert set(beat) == HEARTBEAT_SHAPE and beat["node"] == NODE
    gpus = beat["gpus"]
    assert isinstance(gpus, list) and [gpu["index"] for gpu in gpus] == [0, 1, 2, 3]
    assert all(set(gpu) == GPU_SHAPE for gpu in gpus)
    assert gpus[2]["capabilities"] == {"nvenc": False, "cuda_decode": False, "scale_cuda": False}

    # A job sent to GPU 2 runs in the process pinned to GPU 2 (on the CPU path: see above).
    source = media_clip("g2.mp4", seconds=1, size="320x240")
    record = client.submit_transcode(source, node=NODE, gpu_index=2, height=120).wait(timeout=60)
    assert record.state is JobState.SUCCEEDED, record.error
    assert (record.worker, record.node, record.gpu) == (f"gpujobs@{NODE}.gpu2", NODE, "2")
    assert record.encode_path == "cpu"
    # Sent to the node: any of its workers; to a GPU or node with no worker: refused at submit.
    assert client.submit_transcode(source, node=NODE, height=240).wait(timeout=60).node == NODE
    with pytest.raises(InvalidSpec, match="no worker on GPU 7 of node 'node-1'"):
        client.submit_transcode(source, node=NODE, gpu_index=7)
    with pytest.raises(InvalidSpec, match="no worker on node 'gpu-node-9'"):
        client.submit_transcode(source, node="gpu-node-9")

    # A child that dies is started again, pinned to the same GPU.
    dead = pinned["1"].pid
    pinned["1"].kill()

    def restarted() -> bool:
        child = children(supervisor.pid).get("1")
        return child is not None and child.pid != dead

    wait_for(restarted, timeout_s=30)
    wait_for(lambda: heartbeat(broker_url).get("workers") == hostnames, timeout_s=60)

    # SIGTERM: passed on for a warm shutdown; the node's heartbeat is withdrawn.
    procs = list(children(supervisor.pid).values())
    # A child stopped within a second of its start can sit in Celery's warm shutdown (seen on a
    # loaded machine); the supervisor kills it after STOP_TIMEOUT_S and still exits 0.
    assert supervisor.stop(timeout_s=STOP_TIMEOUT_S + 60) == 0
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive
    assert heartbeat(broker_url) == {}


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env}, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "gpus", "message"),
    [
        (["--gpus", "9"], 4, "error: --gpus '9': this node has no GPU 9 (GPUs found: 0, 1, 2, 3)"),
        (["--gpus", "abc"], 4, "error: --gpus 'abc': expected all, none or GPU indices like 0,2"),
        (["--gpus", "0,0"], 4, "error: --gpus '0,0': GPU 0 is named twice"),
        (["--gpus", "all", "--per-gpu", "0"], 4, "error: --per-gpu must be at least 1, got 0"),
        (["--gpus", "all"], 0, "error: --gpus all: nvidia-smi finds no GPU on this node"),
        (["--gpus", "none", "--loglevel", "loud"], 4, "error: Invalid value for '--loglevel'"),
        (["--loglevel", "loud"], 0, "error: Invalid value for '--loglevel'"),
    ],
)
def test_bad_worker_options_get_one_line(
    settings: object, args: list[str], gpus: int, message: str
) -> None:
    result = run_cli("worker", *args, env=fake_env(gpus))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_gpus_none_runs_one_cpu_worker_that_stops_when_its_supervisor_dies(
    broker_url: str, settings: object, start_worker: Callable[..., WorkerProcess]
) -> None:
    supervisor = start_worker("--gpus", "none", env=fake_env(4))
    wait_for(lambda: heartbeat(broker_url).get("workers") == [f"gpujobs@{NODE}.cpu"], timeout_s=60)
    assert heartbeat(broker_url)["gpus"] == []
    [child] = children(supervisor.pid).values()
    assert child.environ()["CUDA_VISIBLE_DEVICES"] == "", "hidden from every GPU"
    os.kill(supervisor.pid, signal.SIGKILL)  # the supervisor alone, not its process group
    # Its report pipe breaks within one heartbeat interval; it then stops warm by itself.
    _, alive = psutil.wait_procs([child], timeout=20)
    assert not alive, "an orphaned worker must not run on unsupervised"
