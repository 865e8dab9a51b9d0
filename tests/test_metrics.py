"""The Prometheus endpoint: defensive heartbeat parsing, and a real scrape of a real
`gpujobs metrics` while a real worker runs one job and others wait in the queue."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gpujobs import keys
from gpujobs.client import Client
from gpujobs.monitor.metrics import GpujobsCollector, parse_heartbeat, queue_depths
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import WorkerProcess

NODE = "gpu-node-7"


def heartbeat(node: str = NODE, **extra: object) -> str:
    """A heartbeat as workers/heartbeat.py writes it."""
    beat = {
        "node": node,
        "ts": time.time(),
        "gpus": [
            {"index": 0, "uuid": "GPU-aaa", "name": "NVIDIA GeForce RTX 5090",
             "memory_total_mb": 32607, "memory_used_mb": 2048, "utilization_pct": 37,
             "capabilities": {"nvenc": True, "cuda_decode": True, "scale_cuda": True}},
            {"index": 1, "uuid": "GPU-bbb", "name": "NVIDIA GeForce RTX 5090",
             "memory_total_mb": 32607, "memory_used_mb": 512, "utilization_pct": 0,
             "capabilities": {"nvenc": True}},
        ],
        "workers": [f"gpujobs@{node}.gpu0", f"gpujobs@{node}.gpu1"],
        "running_jobs": ["3f2a9c1b7d4e"],
        "nvenc_slots_in_use": 1,
    }  # fmt: skip
    beat.update(extra)
    return json.dumps(beat)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str
) -> float:
    return scraped[(metric, tuple(sorted(labels.items())))]


def test_heartbeats_are_parsed_defensively() -> None:
    now = time.time()
    stat = parse_heartbeat(NODE, heartbeat(), now)
    assert stat is not None and [g.index for g in stat.gpus] == [0, 1]
    assert stat.gpus[0].utilization_pct == 37 and stat.nvenc_slots_in_use == 1
    assert parse_heartbeat(NODE, b"not json", now) is None
    assert parse_heartbeat(NODE, "[1, 2]", now) is None
    odd = parse_heartbeat(NODE, json.dumps({
        "ts": "yesterday", "gpus": [{"name": "no index"}, "junk", {"index": 3,
        "utilization_pct": "high", "memory_used_mb": None, "capabilities": ["nvenc"]}],
        "workers": "one", "nvenc_slots_in_use": True}), now)  # fmt: skip
    assert odd is not None and odd.node == NODE and odd.ts is None and odd.workers == []
    assert [(g.index, g.utilization_pct, g.memory_used_mb, g.capabilities) for g in odd.gpus] == [
        (3, None, None, {})
    ]
    assert odd.nvenc_slots_in_use is None


def test_a_scrape_without_redis_says_so() -> None:
    # Nothing listens on port 1: the scrape still succeeds and reports Redis down.
    dead = redis.Redis(port=1, socket_connect_timeout=0.5)
    families = list(GpujobsCollector(dead).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("gpujobs_redis_up", 0)]


def test_a_taken_port_is_one_line_not_a_traceback() -> None:
    import socket

    from gpujobs.errors import GpujobsError
    from gpujobs.monitor.metrics import serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GpujobsError, match=f"cannot serve metrics on 127.0.0.1:{port}: "):
            serve_metrics(redis.Redis(port=1), "127.0.0.1", port)


@pytest.fixture
def metrics_url(settings: object, tmp_path: Path) -> Iterator[str]:
    """A real `gpujobs metrics --port 0`; its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpujobs", "metrics", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.search(r"serving metrics on (http://\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(30) and found, "gpujobs metrics did not start"
        yield found[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_scrape_while_jobs_are_queued_and_running(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    metrics_url: str,
) -> None:
    r = client.redis
    long_clip = media_clip("long.mp4", seconds=30, size="1920x1080")
    worker = start_worker("--queues", "transcode", "--concurrency", "1")
    running = client.submit_transcode(long_clip, preset="p7", height=1080)
    for record in running.watch(timeout=60):
        if record.state is JobState.RUNNING and record.percent > 0:
            break
    # Three more wait behind it, at three priorities: three different priority lists.
    short = media_clip("short.mp4", seconds=1, size="320x240")
    waiting = [
        client.submit_transcode(short, f"out{p}.mp4", height=120, priority=p) for p in (0, 5, 9)
    ]
    # Someone else's node: a heartbeat and two live NVENC holders (one expired holder).
    r.set(keys.heartbeat(NODE), heartbeat(), ex=30)
    r.sadd(keys.NODES, NODE)
    now = float(r.time()[0])
    r.zadd(keys.nvenc_slots(NODE), {"w1": now + 30, "w2": now + 30, "dead": now - 5})
    # Two inference batches as the inference worker records them: one running, one finished.
    for job_id, state, rates in (
        ("inf-running", JobState.RUNNING, (12.5, 850.0)),
        ("inf-done", JobState.SUCCEEDED, (99.0, 9999.0)),
    ):
        client.store.create(JobRecord(
            id=job_id, kind=JobKind.INFERENCE, state=state, spec={"input": "batch.jsonl"},
            created_at=time.time(),
            result={"request_counts": {"total": 100, "completed": 40, "failed": 2},
                    "requests_per_s": rates[0], "tokens_per_s": rates[1]}))  # fmt: skip

    scraped = samples(httpx.get(metrics_url, timeout=10).text)

    assert value(scraped, "gpujobs_redis_up") == 1
    # The depth counts every priority list: the three waiting jobs sit in three of them.
    lists = [name for name in keys.queue_lists("transcode") if r.llen(name)]
    assert len(lists) == 3
    assert value(scraped, "gpujobs_queue_depth", queue="transcode") == 3
    assert value(scraped, "gpujobs_queue_depth", queue="inference") == 0
    assert queue_depths(r, ["transcode"]) == {"transcode": 3}
    assert value(scraped, "gpujobs_jobs", kind="transcode", state="running") == 1
    assert value(scraped, "gpujobs_jobs", kind="transcode", state="queued") == 3
    assert value(scraped, "gpujobs_jobs", kind="transcode", state="succeeded") == 0
    assert value(scraped, "gpujobs_jobs", kind="inference", state="running") == 1
    assert value(scraped, "gpujobs_jobs", kind="inference", state="succeeded") == 1
    assert value(scraped, "gpujobs_nvenc_slots_in_use", node=NODE) == 2
    gpu0 = {"node": NODE, "gpu": "0", "uuid": "GPU-aaa", "name": "NVIDIA GeForce RTX 5090"}
    assert value(scraped, "gpujobs_gpu_utilization_percent", **gpu0) == 37
    assert value(scraped, "gpujobs_gpu_memory_used_bytes", **gpu0) == 2048 * 1024 * 1024
    assert value(scraped, "gpujobs_gpu_memory_total_bytes", **gpu0) == 32607 * 1024 * 1024
    assert value(scraped, "gpujobs_node_up", node=NODE) == 1
    # Rates are of the running batch only; request counts cover every kept batch.
    assert value(scraped, "gpujobs_inference_requests_per_second") == 12.5
    assert value(scraped, "gpujobs_inference_tokens_per_second") == 850.0
    assert value(scraped, "gpujobs_inference_requests", status="completed") == 80
    assert value(scraped, "gpujobs_inference_requests", status="failed") == 4

    # The scrape reads Redis each time: the queue drains as the worker takes the next job.
    running.cancel()
    first = waiting[-1].wait(timeout=60)  # priority 9 goes first
    assert first.state is JobState.SUCCEEDED
    again = samples(httpx.get(metrics_url, timeout=10).text)
    assert value(again, "gpujobs_queue_depth", queue="transcode") <= 2
    assert value(again, "gpujobs_jobs", kind="transcode", state="cancelled") == 1
    worker.kill()
