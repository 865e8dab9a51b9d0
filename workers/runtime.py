"""What a worker process holds for the jobs it runs: settings, store, identity, GPU capabilities.

Built once per process on first use (after Celery forks its pool children: a Redis connection
pool must not cross a fork).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from gpujobs.config import Settings
from gpujobs.connection import broker_url, connect
from gpujobs.store import JobStore
from workers.gpu.discovery import Capabilities, detect_capabilities
from workers.lease import Leases


class PathOutsideMediaRoot(Exception):
    """A job path resolves (through a symlink, say) to a place outside the media root."""


@dataclass
class WorkerRuntime:
    settings: Settings
    pid: int

    @cached_property
    def store(self) -> JobStore:
        url = broker_url(self.settings, start_local=False)
        return JobStore(connect(url, self.settings), record_ttl_s=self.settings.record_ttl_s)

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.store.redis, lease_s=self.settings.lease_s)

    @cached_property
    def ffmpeg(self) -> str:
        return self.settings.ffmpeg_binary()

    @cached_property
    def ffmpeg_version(self) -> str:
        """The ffmpeg build's version, asked once per process (`ffmpeg -version` is a process
        start, tens of milliseconds: too much to pay per job)."""
        from workers.transcode.command import ffmpeg_version

        return ffmpeg_version(self.ffmpeg)

    @cached_property
    def capabilities(self) -> Capabilities:
        return detect_capabilities(self.ffmpeg)

    @property
    def gpu_label(self) -> str:
        """The GPU this process is pinned to ("cpu" when none)."""
        if not self.capabilities.has_gpu:
            return "cpu"
        return os.environ.get("CUDA_VISIBLE_DEVICES", "0")

    def media_path(self, relative: str) -> Path:
        """The absolute path of a spec path, refusing anything that escapes the media root."""
        root = self.settings.media.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise PathOutsideMediaRoot(f"{relative} resolves outside the media root")
        return path


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    """This process's runtime, made anew in a forked child."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = WorkerRuntime(settings=Settings(), pid=os.getpid())
    return _runtime
