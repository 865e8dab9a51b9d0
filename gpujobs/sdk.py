"""The one-call SDK: submit or look up a job with a new Client (settings from GPUJOBS_*).

Each function makes a Client and calls the method of the same name; see gpujobs.client for what
every parameter means. A program that submits many jobs keeps one Client instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpujobs.client import Client, Job
from gpujobs.config import AudioMode, Codec, Preset
from gpujobs.specs import AudioTracks, GpuPolicy, SplitSetting, SubtitleMode


def submit_transcode(
    input: str | Path,
    output: str | Path | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    codec: Codec | None = None,
    preset: Preset | None = None,
    cq: int | None = None,
    audio: AudioMode | None = None,
    threads: int | None = None,
    priority: int | None = None,
    gpu: GpuPolicy | None = None,
    audio_tracks: AudioTracks | None = None,
    subtitles: SubtitleMode | None = None,
    fps: float | None = None,
    overwrite: bool = False,
    split: SplitSetting | None = None,
    node: str | None = None,
    gpu_index: int | None = None,
    copy_outside: bool = True,
    force: bool = False,
) -> Job:
    """Queue a transcode with a new Client (settings from GPUJOBS_*); see
    Client.submit_transcode for every parameter."""
    return Client().submit_transcode(
        input, output, width=width, height=height, codec=codec, preset=preset, cq=cq,
        audio=audio, threads=threads, priority=priority, gpu=gpu, audio_tracks=audio_tracks,
        subtitles=subtitles, fps=fps, overwrite=overwrite, split=split, node=node,
        gpu_index=gpu_index, copy_outside=copy_outside, force=force,
    )  # fmt: skip


def submit_many(
    items: Iterable[str | Path | Mapping[str, Any]],
    *,
    force: bool = False,
    batch_size: int = 500,
) -> list[Job]:
    """Queue many transcodes with a new Client (settings from GPUJOBS_*), `batch_size` per
    round trip; see Client.submit_many for the items."""
    return Client().submit_many(items, force=force, batch_size=batch_size)


def submit_inference(
    input: str | Path | Iterable[Mapping[str, Any]],
    output: str | Path | None = None,
    *,
    endpoint: str | None = None,
    model: str | None = None,
    max_concurrency: int | None = None,
    chunk_size: int | None = None,
    request_timeout_s: float | None = None,
    max_retries: int | None = None,
    deadline_s: float | None = None,
    server_wait_s: float | None = None,
    priority: int | None = None,
    adaptive: bool | None = None,
    overwrite: bool = False,
) -> Job:
    """Queue a batch inference job with a new Client (settings from GPUJOBS_*); see
    Client.submit_inference for every parameter."""
    return Client().submit_inference(
        input, output, endpoint=endpoint, model=model, max_concurrency=max_concurrency,
        chunk_size=chunk_size, request_timeout_s=request_timeout_s, max_retries=max_retries,
        deadline_s=deadline_s, server_wait_s=server_wait_s, priority=priority, adaptive=adaptive,
        overwrite=overwrite,
    )  # fmt: skip


def get_job(job_id: str) -> Job:
    """A handle on an existing job; JobNotFound when there is no such job."""
    job = Job(job_id)
    job.status()
    return job
