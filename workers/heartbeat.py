"""Node heartbeats: what a node runs, written to Redis every few seconds with a TTL.

One JSON document per node (keys.HEARTBEAT), its name added to keys.NODES:

    {"node": "node-1", "ts": 1764363000.5,
     "gpus": [{"index": 2, "uuid": "GPU-...", "name": "NVIDIA GeForce RTX 5090",
               "memory_total_mb": 32607, "memory_used_mb": 1200, "utilization_pct": 35,
               "capabilities": {"nvenc": true, "cuda_decode": true, "scale_cuda": true}}],
     "workers": ["gpujobs@node-1.gpu2"], "running_jobs": ["3f2a9c1b7d4e"],
     "nvenc_slots_in_use": 1}

`gpujobs gpus`, the submit-time routing check, `gpujobs worker --check` (the liveness probe) and
the Prometheus exporter read exactly this shape; add to it, never rename.

Who writes it: the supervisor (`gpujobs worker --gpus ...`) for its whole node, from the reports
its pinned workers send it over a pipe once they are ready; a plain `gpujobs worker` writes its own.
A pinned worker whose supervisor is gone (its pipe breaks) shuts itself down warm.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from gpujobs import keys
from workers.gpu.discovery import Capabilities, GpuInfo, detect_capabilities, list_gpus, pinned_gpu

log = logging.getLogger(__name__)

# The write end of the supervisor's report pipe, in a pinned worker's environment.
SUPERVISOR_FD_ENV = "GPUJOBS_SUPERVISOR_FD"

Heartbeat = dict[str, Any]


def gpu_entry(gpu: GpuInfo, caps: Capabilities) -> dict[str, Any]:
    """One GPU as the heartbeat carries it (memory in MiB, utilisation in percent)."""
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_total_mb": gpu.memory_total_mb,
        "memory_used_mb": gpu.memory_used_mb,
        "utilization_pct": gpu.utilization_pct,
        "capabilities": caps.flags(),
    }


def make_heartbeat(
    node: str,
    gpus: list[dict[str, Any]],
    workers: list[str],
    running_jobs: list[str],
    nvenc_slots_in_use: int,
) -> Heartbeat:
    return {
        "node": node,
        "ts": time.time(),
        "gpus": gpus,
        "workers": sorted(workers),
        "running_jobs": sorted(running_jobs),
        "nvenc_slots_in_use": nvenc_slots_in_use,
    }


def publish(client: redis.Redis, beat: Heartbeat, ttl_s: float) -> None:
    """Write one heartbeat (expiring after ttl_s seconds) and list its node."""
    with client.pipeline() as pipe:
        pipe.set(keys.heartbeat(beat["node"]), json.dumps(beat), px=int(ttl_s * 1000))
        pipe.sadd(keys.NODES, beat["node"])
        pipe.execute()


def withdraw(client: redis.Redis, node: str) -> None:
    """Remove a node's heartbeat on a clean stop: no job is routed to it any more."""
    with client.pipeline() as pipe:
        pipe.delete(keys.heartbeat(node))
        pipe.srem(keys.NODES, node)
        pipe.execute()


class HeartbeatWriter:
    """Writes `collect()` every interval_s seconds (TTL ttl_s) from a daemon thread.

    A failing round (Redis away, nvidia-smi stuck) is logged and skipped: a heartbeat must never
    take the worker down; the probe notices the silence instead.
    """

    def __init__(
        self,
        client: redis.Redis,
        node: str,
        collect: Callable[[], Heartbeat],
        interval_s: float = 5.0,
        ttl_s: float = 30.0,
    ) -> None:
        self.redis = client
        self.node = node
        self.collect = collect
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        publish(self.redis, self.collect(), self.ttl_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # never let a heartbeat kill its worker
                log.warning("heartbeat of %s not written: %s", self.node, exc)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self, withdraw_beat: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if withdraw_beat:
            try:
                withdraw(self.redis, self.node)
            except redis.RedisError as exc:
                log.warning("heartbeat of %s not withdrawn: %s", self.node, exc)


def running_job_ids() -> list[str]:
    """Ids of the jobs this Celery worker's pool runs now (the task id is the job id).

    Read in the worker's main process, which tracks what it handed to its pool children.
    """
    from celery.worker import state

    return [str(request.id) for request in list(state.active_requests)]


class SupervisorReporter:
    """In a pinned worker: tells the supervisor, over the inherited pipe, that this worker is
    alive and what it runs, every interval_s seconds. When the pipe breaks the supervisor is
    gone, and the worker stops itself warm (SIGTERM) rather than run on unsupervised."""

    def __init__(self, fd: int, hostname: str, interval_s: float = 5.0) -> None:
        self.fd = fd
        self.hostname = hostname
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="report", daemon=True)

    def report(self) -> None:
        line = json.dumps(
            {"worker": self.hostname, "pid": os.getpid(), "running_jobs": running_job_ids()}
        )
        # One write, under PIPE_BUF (4 KiB) for up to ~100 running jobs: lines from several
        # workers never interleave.
        os.write(self.fd, (line + "\n").encode())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.report()
            except BrokenPipeError:
                log.warning("supervisor gone; stopping this worker")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except Exception as exc:  # a dead reporter would drop this worker from the heartbeat
                log.warning("report to the supervisor failed: %s", exc)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self, withdraw_beat: bool = True) -> None:
        self._stop.set()


def single_worker_heartbeat(
    client: redis.Redis, node: str, hostname: str, ffmpeg: str, nvenc_in_use: Callable[[], int],
    interval_s: float = 5.0, ttl_s: float = 30.0,
) -> HeartbeatWriter:  # fmt: skip
    """The heartbeat of a plain `gpujobs worker` (no supervisor): itself, its GPU if it has one."""

    def collect() -> Heartbeat:
        gpu = pinned_gpu(list_gpus())
        caps = detect_capabilities(ffmpeg)
        gpus = [gpu_entry(gpu, caps)] if gpu is not None and caps.has_gpu else []
        return make_heartbeat(node, gpus, [hostname], running_job_ids(), nvenc_in_use())

    return HeartbeatWriter(client, node, collect, interval_s, ttl_s)


def attach(hostname: str) -> None:
    """Start this worker's heartbeat (or its reports to the supervisor) once Celery is ready,
    and stop it on shutdown. Never raises: a worker without a heartbeat still runs jobs."""
    from celery import signals

    from gpujobs.config import Settings
    from gpujobs.connection import broker_url, connect
    from workers.gpu.nvenc import NvencSemaphore

    settings = Settings()
    beat: HeartbeatWriter | SupervisorReporter
    fd = os.environ.get(SUPERVISOR_FD_ENV)
    try:
        if fd:
            beat = SupervisorReporter(int(fd), hostname, settings.heartbeat_interval_s)
        else:
            client = connect(broker_url(settings, start_local=False), settings)
            slots = NvencSemaphore(client, settings.node_name, settings.nvenc_sessions)
            beat = single_worker_heartbeat(
                client, settings.node_name, hostname, settings.ffmpeg_binary(), slots.in_use,
                settings.heartbeat_interval_s, settings.heartbeat_ttl_s,
            )  # fmt: skip
    except Exception as exc:
        log.warning("no heartbeat for %s: %s", hostname, exc)
        return

    def on_ready(**_: Any) -> None:
        beat.start()

    def on_shutdown(**_: Any) -> None:
        beat.stop()

    # weak=False: these closures have no other reference and would be collected at once.
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
