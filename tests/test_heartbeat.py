"""Heartbeats: what a plain worker writes, the liveness probe (`worker --check`), `gpujobs gpus`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import redis

from gpujobs import keys
from gpujobs.cli.gpu import gpus_table
from gpujobs.config import Settings
from tests.helpers import WorkerProcess, wait_for
from workers import heartbeat

EXPORTER_SHAPE = {"node", "ts", "gpus", "workers", "running_jobs", "nvenc_slots_in_use"}


def gpujobs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def beat(node: str, age_s: float = 0.0, **fields: object) -> dict[str, object]:
    data = heartbeat.make_heartbeat(node, [], [f"gpujobs@{node}.cpu"], [], 0)
    data["ts"] = time.time() - age_s
    return {**data, **fields}


def test_a_plain_worker_writes_its_nodes_heartbeat_and_withdraws_it(
    settings: Settings, broker_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    r = redis.Redis.from_url(broker_url)
    worker = start_worker("--queues", "transcode", env={"GPUJOBS_HEARTBEAT_INTERVAL_S": "0.2"})
    raw = wait_for(lambda: r.get(keys.heartbeat(settings.node_name)), timeout_s=10)
    data = json.loads(raw)
    assert set(data) == EXPORTER_SHAPE
    assert data["workers"] == [f"gpujobs@{settings.node_name}"] and data["gpus"] == []
    assert r.sismember(keys.NODES, settings.node_name)
    assert gpujobs("worker", "--check").returncode == 0
    assert worker.stop() == 0
    assert not r.exists(keys.heartbeat(settings.node_name)), "a clean stop withdraws it"


def test_check_fails_without_a_fresh_heartbeat(settings: Settings, broker_url: str) -> None:
    r = redis.Redis.from_url(broker_url)
    node = settings.node_name
    missing = gpujobs("worker", "--check")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: node {node} has no heartbeat (is its worker running?)"
    heartbeat.publish(r, beat(node, age_s=120), ttl_s=300)  # a writer that hung
    stale = gpujobs("worker", "--check")
    # 120 s old when written; a second or two more by the time the check runs on a busy machine.
    assert stale.returncode == 1
    assert re.search(r"heartbeat is 12[0-9] s old \(limit 30 s\)", stale.stderr), stale.stderr
    heartbeat.publish(r, beat(node), ttl_s=30)
    fresh = gpujobs("worker", "--check")
    assert fresh.returncode == 0, fresh.stderr


def test_gpus_lists_nodes_gpus_and_jobs(settings: Settings, broker_url: str) -> None:
    r = redis.Redis.from_url(broker_url)
    assert "no worker has a live heartbeat" in gpujobs("gpus").stdout
    gpu = {"index": 2, "uuid": "GPU-2", "name": "NVIDIA H200", "memory_total_mb": 143771,
           "memory_used_mb": 1024, "utilization_pct": 35,
           "capabilities": {"nvenc": False, "cuda_decode": True, "scale_cuda": True}}  # fmt: skip
    heartbeat.publish(
        r, beat("gpu-node-1", gpus=[gpu], workers=["gpujobs@gpu-node-1.gpu2"],
                running_jobs=["3f2a9c1b7d4e"], nvenc_slots_in_use=0), ttl_s=30,
    )  # fmt: skip
    heartbeat.publish(r, beat("cpu-node"), ttl_s=30)
    r.sadd(keys.NODES, "gone-node")  # its heartbeat expired: dropped from the list
    result = gpujobs("gpus", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("gpu-node-1", "H200", "gpujobs@gpu-node-1.gpu2", "3f2a9c1b7d4e", "cpu-node",
                 "CPU only", "1.0 / 140.4", "nvdec+scale"):  # fmt: skip
        assert text in out, out
    # In 80 columns every column is there and no line is longer (scale_cuda used to fold).
    narrow = gpujobs("gpus", env={"COLUMNS": "80"}).stdout
    assert all(len(line) <= 80 for line in narrow.splitlines()), narrow
    header = next(line for line in narrow.splitlines() if line.startswith("node"))
    assert header.split() == ["node", "gpu", "name", "memory", "GiB", "util", "can", "workers",
                              "slots", "jobs", "seen"]  # fmt: skip
    assert "gone-node" not in out and not r.sismember(keys.NODES, "gone-node")
    as_json = json.loads(gpujobs("gpus", "--json").stdout)
    assert sorted(as_json) == ["cpu-node", "gpu-node-1"]


def test_gpus_table_marks_a_gpu_without_a_worker() -> None:
    gpu = {"index": 0, "name": "x", "capabilities": {}}
    table = gpus_table({"n": beat("n", gpus=[gpu], workers=[])})
    assert table.row_count == 1


def test_gpus_table_shows_names_as_text_not_markup() -> None:
    import io

    from rich.console import Console

    gpu = {"index": 0, "name": "[/bold]odd", "memory_used_mb": 1200.0, "capabilities": {}}
    table = gpus_table({"n[/x]": beat("n[/x]", gpus=[gpu], workers=[])})
    console = Console(width=300, record=True, color_system=None, file=io.StringIO())
    console.print(table)  # a `[/x]` read as markup would raise MarkupError
    text = console.export_text()
    assert "n[/x]" in text and "[/bold]odd" in text and "1.2 / ?" in text


def test_submit_to_a_node_or_gpu_without_a_worker_is_refused(
    settings: Settings, broker_url: str, media_clip: Callable[..., object]
) -> None:
    r = redis.Redis.from_url(broker_url)
    heartbeat.publish(r, beat("gpu-node-1", workers=["gpujobs@gpu-node-1.gpu2"]), ttl_s=30)
    clip = str(media_clip("c.mp4", seconds=1, size="320x240"))
    cases = {
        ("--node", "gpu-node-1", "--gpu-index", "5"):
            "error: no worker on GPU 5 of node 'gpu-node-1' (GPUs with workers: 2)",
        ("--node", "gpu-node-7"):
            "error: no worker on node 'gpu-node-7' (no heartbeat; nodes up: gpu-node-1)",
        ("--gpu-index", "2"): "error: a GPU index needs a node (--node) to say whose GPU it is",
    }  # fmt: skip
    for args, message in cases.items():
        result = gpujobs("submit", clip, *args)
        assert (result.returncode, result.stderr.strip()) == (2, message)
    assert not r.keys(keys.job("*")), "nothing queued"
    queued = gpujobs("submit", clip, "--node", "gpu-node-1", "--gpu-index", "2")
    assert queued.returncode == 0, queued.stderr
    assert sum(r.llen(name) for name in keys.queue_lists("transcode.gpu-node-1.gpu2")) == 1
