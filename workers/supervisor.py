"""One pinned Celery worker process per GPU: `gpujobs worker --gpus all|0,2|none [--per-gpu N]`.

On WSL2 the NVIDIA device plugin hands a pod all of a node's GPUs as one device (/dev/dxg), so the
pinning is ours: each child sees exactly one GPU (CUDA_VISIBLE_DEVICES=<index>, numbered in PCI
order like nvidia-smi), is named after node and GPU (`gpujobs@node-1.gpu2`) and consumes
`transcode`, its node's queue (`transcode.node-1`) and its GPU's (`transcode.node-1.gpu2`), so a
producer can send a job to any GPU, one node, or one GPU of one node.

The supervisor measures each GPU once and hands the result to its child, restarts a child that
dies (after 1 s, doubling to 30 s while it keeps dying), passes SIGTERM on for Celery's warm
shutdown, and writes the node's heartbeat from what its children report over a pipe.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from gpujobs.app import (
    GPU_TRANSCODE_QUEUE,
    TRANSCODE_QUEUE,
    gpu_queue,
    node_queue,
    worker_hostname,
)
from gpujobs.config import Settings
from gpujobs.errors import UsageError
from workers import heartbeat
from workers.gpu.discovery import MEASURED_ENV, NO_GPU, Capabilities, GpuInfo, list_gpus, measure
from workers.gpu.nvenc import NvencSemaphore

log = logging.getLogger("gpujobs.supervisor")

RESTART_BACKOFF_S = (1.0, 30.0)  # first delay before restarting a dead child, and the most
STABLE_AFTER_S = 60.0  # a child that ran this long before dying starts again at the first delay
STOP_TIMEOUT_S = 60.0  # seconds children get for a warm shutdown before SIGKILL


class BadWorkerOptions(UsageError):
    """--gpus / --per-gpu make no sense on this node."""


def select_gpus(text: str, gpus: list[GpuInfo]) -> list[GpuInfo] | None:
    """The GPUs `--gpus` names: "all", "none" (None: one CPU worker) or indices "0,2".

    Raises BadWorkerOptions (one line) for anything else or an index this node does not have.
    """
    value = text.strip().lower()
    found = ", ".join(str(gpu.index) for gpu in gpus) or "none"
    if value == "none":
        return None
    if value == "all":
        if not gpus:
            raise BadWorkerOptions(
                "--gpus all: nvidia-smi finds no GPU on this node; use --gpus none for a CPU worker"
            )
        return list(gpus)
    by_index = {gpu.index: gpu for gpu in gpus}
    chosen: list[GpuInfo] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            raise BadWorkerOptions(
                f"--gpus {text!r}: expected all, none or GPU indices like 0,2 (got {part!r})"
            )
        index = int(part)
        if index not in by_index:
            raise BadWorkerOptions(
                f"--gpus {text!r}: this node has no GPU {index} (GPUs found: {found})"
            )
        if by_index[index] in chosen:
            raise BadWorkerOptions(f"--gpus {text!r}: GPU {index} is named twice")
        chosen.append(by_index[index])
    return chosen


@dataclass
class Child:
    """One pinned worker: what it is, and the process that is it now."""

    hostname: str
    queues: list[str]
    gpu: GpuInfo | None
    caps: Capabilities
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_S[0]
    restarts: int = 0

    @property
    def cuda_visible_devices(self) -> str:
        # Empty hides every GPU from CUDA: the CPU worker of `--gpus none` cannot wander onto one.
        return "" if self.gpu is None else str(self.gpu.index)


@dataclass
class Report:
    pid: int
    running_jobs: list[str]
    at: float = field(default_factory=time.monotonic)


def plan_children(
    settings: Settings, chosen: list[GpuInfo] | None, caps: dict[int, Capabilities],
    base_queues: list[str],
) -> list[Child]:  # fmt: skip
    """One child per chosen GPU (one CPU child for None) with its hostname and queues."""
    node = settings.node_name
    targets: list[GpuInfo | None] = [None] if chosen is None else list(chosen)
    children = []
    for gpu in targets:
        queues = list(base_queues)
        if TRANSCODE_QUEUE in base_queues:
            queues.append(node_queue(node))
            if gpu is not None:  # and the jobs that require a GPU (no CPU child takes them)
                queues += [gpu_queue(node, gpu.index), GPU_TRANSCODE_QUEUE]
        children.append(
            Child(
                hostname=worker_hostname(node, None if gpu is None else gpu.index),
                queues=queues,
                gpu=gpu,
                caps=NO_GPU if gpu is None else caps.get(gpu.index, NO_GPU),
            )
        )
    return children


class Supervisor:
    """Runs `children` until SIGTERM/SIGINT. per_gpu: jobs at once per child (its pool size)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        children: list[Child],
        per_gpu: int = 1,
        loglevel: str = "INFO",
    ) -> None:
        self.settings = settings
        self.redis = client
        self.children = children
        self.per_gpu = per_gpu
        self.loglevel = loglevel
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._reports: dict[str, Report] = {}
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        self._slots = NvencSemaphore(client, settings.node_name, settings.nvenc_sessions)
        self.heartbeat = heartbeat.HeartbeatWriter(
            client,
            settings.node_name,
            self.collect,
            settings.heartbeat_interval_s,
            settings.heartbeat_ttl_s,
        )

    # -- children -------------------------------------------------------------------------

    def command(self, child: Child) -> list[str]:
        return [
            sys.executable, "-m", "gpujobs", "worker",
            "--queues", ",".join(child.queues),
            "--concurrency", str(self.per_gpu),
            "--hostname", child.hostname,
            "--loglevel", self.loglevel,
        ]  # fmt: skip

    def environment(self, child: Child) -> dict[str, str]:
        return {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": child.cuda_visible_devices,
            # CUDA numbers GPUs fastest first unless told otherwise; nvidia-smi uses PCI order.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            MEASURED_ENV: child.caps.to_json(),
            heartbeat.SUPERVISOR_FD_ENV: str(self._write_fd),
        }

    def start(self, child: Child) -> None:
        # Same process group as the supervisor (no new session): whatever kills the pod's
        # process group, or a test's, takes the children along.
        child.proc = subprocess.Popen(
            self.command(child),
            env=self.environment(child),
            stdin=subprocess.DEVNULL,
            pass_fds=(self._write_fd,),
        )
        child.started_at = time.monotonic()
        log.info(
            "started %s (pid %d, CUDA_VISIBLE_DEVICES=%r, queues %s)",
            child.hostname, child.proc.pid, child.cuda_visible_devices, ",".join(child.queues),
        )  # fmt: skip

    def reap(self, now: float) -> None:
        """Schedule a restart for each child that has died."""
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            if now - child.started_at >= STABLE_AFTER_S:
                child.backoff_s = RESTART_BACKOFF_S[0]
            child.restart_at = now + child.backoff_s
            log.warning(
                "%s (pid %d) exited with %s; restarting in %.0f s",
                child.hostname, child.proc.pid, code, child.backoff_s,
            )  # fmt: skip
            child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_S[1])
            child.proc = None
            child.restarts += 1
            with self._lock:
                self._reports.pop(child.hostname, None)

    # -- reports and heartbeat --------------------------------------------------------------

    def _read_reports(self) -> None:
        with os.fdopen(self._read_fd, "rb") as pipe:
            for raw in pipe:
                try:
                    data = json.loads(raw)
                    report = Report(pid=int(data["pid"]), running_jobs=list(data["running_jobs"]))
                    name = str(data["worker"])
                except (ValueError, KeyError, TypeError):
                    continue
                with self._lock:
                    self._reports[name] = report

    def live_workers(self) -> dict[str, Report]:
        """Children that are running and reported within the heartbeat TTL."""
        now = time.monotonic()
        # Read each child's process once: the main loop sets it to None when the child dies.
        procs = [(child.hostname, child.proc) for child in self.children]
        alive = {name: proc.pid for name, proc in procs if proc is not None and proc.poll() is None}
        with self._lock:
            return {
                name: report
                for name, report in self._reports.items()
                if alive.get(name) == report.pid
                and now - report.at <= self.settings.heartbeat_ttl_s
            }

    def collect(self) -> heartbeat.Heartbeat:
        live = self.live_workers()
        fresh = {gpu.index: gpu for gpu in list_gpus()}  # memory and utilisation change
        gpus = []
        for child in self.children:
            if child.gpu is None:
                continue
            gpu = fresh.get(child.gpu.index, child.gpu)
            gpus.append(heartbeat.gpu_entry(gpu, child.caps))
        running = [job for report in live.values() for job in report.running_jobs]
        return heartbeat.make_heartbeat(
            self.settings.node_name, gpus, list(live), running, self._slots.in_use()
        )

    # -- the loop -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGCHLD:
            self._wake.set()
            return
        self._stopping.set()
        self._wake.set()

    def run(self) -> int:
        """Start every child, keep them running until SIGTERM/SIGINT, stop them warm. Returns
        the exit code (0)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        threading.Thread(target=self._read_reports, name="reports", daemon=True).start()
        try:
            # Inside the try: a child that cannot start stops the ones already started.
            for child in self.children:
                self.start(child)
            self.heartbeat.start()
            while not self._stopping.is_set():
                # Woken by SIGCHLD; the timeout bounds a missed wake-up and times restarts.
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                now = time.monotonic()
                self.reap(now)
                for child in self.children:
                    if child.proc is None and now >= child.restart_at:
                        self.start(child)
        finally:
            self.stop_children()
            self.heartbeat.stop()
        return 0

    def stop_children(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every child (Celery's warm shutdown: running jobs finish), SIGKILL the ones
        still there after timeout_s seconds."""
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            log.info("stopping pid %d (warm shutdown)", proc.pid)
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()


def run_supervisor(
    gpus: str,
    per_gpu: int = 1,
    queues: list[str] | None = None,
    loglevel: str = "INFO",
) -> int:
    """`gpujobs worker --gpus ...`: check the options, measure the GPUs, supervise. Blocks.

    gpus: "all", "none" or indices "0,2"; per_gpu: jobs at once on each GPU (default 1);
    queues: the shared queues every child consumes (default: transcode).
    """
    if per_gpu < 1:
        raise BadWorkerOptions(f"--per-gpu must be at least 1, got {per_gpu}")
    loglevel = loglevel.strip().upper()  # Celery takes `info`; logging wants `INFO`
    if not isinstance(logging.getLevelName(loglevel), int):
        raise BadWorkerOptions(f"--loglevel {loglevel!r}: expected DEBUG, INFO, WARNING or ERROR")
    chosen = select_gpus(gpus, list_gpus())
    settings = Settings()
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gpujobs.connection import broker_url, connect

    client = connect(broker_url(settings, start_local=False), settings)
    ffmpeg = settings.ffmpeg_binary()
    caps = {gpu.index: measure(ffmpeg, gpu) for gpu in chosen or []}
    for gpu in chosen or []:
        log.info("GPU %d %s: %s", gpu.index, gpu.name, caps.get(gpu.index, NO_GPU).flags())
    children = plan_children(settings, chosen, caps, queues or [TRANSCODE_QUEUE])
    return Supervisor(settings, client, children, per_gpu, loglevel).run()
