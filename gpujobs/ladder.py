"""Adaptive bitrate ladders: one input encoded once per rendition height, packaged for HLS (fMP4
segments, a master playlist) or DASH (an MPD), written as one folder.

The bitrate table: each rendition is encoded at constant quality (cq/crf, default 23) with its
bitrate capped (VBV: `maxrate`, buffer twice that), so simple content stays small and busy
content never exceeds what a player on that rung expects. Values (kbit/s, H.264, 30 fps) follow
Apple's HLS authoring guidance, rounded:

    height   2160   1440   1080   720   540   480   360   240
    maxrate 16000   9000   5000  3000  2000  1400   800   400
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from celery import Celery
from pydantic import Field, ValidationError, field_validator

from gpujobs.app import TRANSCODE_TASK, broker_priority, shared_transcode_queue
from gpujobs.client import Client, Job
from gpujobs.config import Preset
from gpujobs.errors import InvalidSpec
from gpujobs.paths import copy_file, media_relative
from gpujobs.routing import require_gpu_worker
from gpujobs.specs import (
    MAX_SPLIT,
    GpuPolicy,
    JobKind,
    JobRecord,
    JobState,
    MediaJobSpec,
    SplitSetting,
    new_job_id,
)
from gpujobs.store import JobStore

# Rendition height (pixels) -> capped video bitrate (kbit/s); see the module docstring.
BITRATE_CAP_KBPS: dict[int, int] = {
    2160: 16000,
    1440: 9000,
    1080: 5000,
    720: 3000,
    540: 2000,
    480: 1400,
    360: 800,
    240: 400,
}
AUDIO_KBPS = 128
DEFAULT_RENDITIONS = (1080, 720, 480)
# hls and dash are for players; mp4 (one MP4 file per rendition) is what the pieces of a split
# ladder make, and what tools that package ladders themselves take.
Package = Literal["hls", "dash", "mp4"]
LadderAudio = Literal["aac", "none"]
# What a ladder's folder holds at its top: the file a player opens.
ENTRY_FILES = {"hls": "master.m3u8", "dash": "manifest.mpd", "mp4": ""}


class LadderSpec(MediaJobSpec):
    """One ABR ladder job. output: a folder (relative to the media root) that appears whole.

    renditions: heights in pixels from BITRATE_CAP_KBPS, largest first (default 1080, 720, 480);
    heights above the source's are skipped at run time. package: "hls" (fMP4 segments,
    master.m3u8), "dash" (manifest.mpd) or "mp4" (`<height>p.mp4` per rendition).
    segment_s: seconds per segment, default 4; every rendition has a keyframe at each segment
    boundary. preset: p1 (fastest)..p7 (NVENC; the x264 preset of the same rank on the CPU).
    cq: constant quality under the cap, default 23. audio: "aac" (AAC in every HLS variant, one
    shared track in DASH: the source's copied when it is AAC already, else encoded at 128
    kbit/s stereo) or "none". threads: decoder threads. priority: 0..9. gpu: auto, require or
    forbid.
    split: None, N or "auto" as for a transcode: each piece's worker makes the ladder of its
    piece (one decode, every rendition, as MP4), then one stream-copy pass joins each rendition
    and packages the whole with the source's audio (workers/transcode/ladder_split.py).
    """

    renditions: list[int] = Field(default_factory=lambda: list(DEFAULT_RENDITIONS))
    package: Package = "hls"
    segment_s: float = Field(default=4.0, ge=1.0, le=20.0)
    preset: Preset = "p1"
    cq: int = Field(default=23, ge=0, le=51)
    audio: LadderAudio = "aac"
    threads: int = Field(default=2, ge=1, le=64)
    priority: int = Field(default=5, ge=0, le=9)
    gpu: GpuPolicy = "auto"
    split: SplitSetting | None = None

    @field_validator("split")
    @classmethod
    def _split_pieces(cls, value: SplitSetting | None) -> SplitSetting | None:
        if isinstance(value, int) and not 1 <= value <= MAX_SPLIT:
            raise ValueError(f"must be auto or 1..{MAX_SPLIT} pieces, got {value}")
        return value

    @field_validator("renditions")
    @classmethod
    def _known_heights(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one rendition height")
        unknown = [h for h in value if h not in BITRATE_CAP_KBPS]
        if unknown:
            known = ", ".join(str(h) for h in BITRATE_CAP_KBPS)
            raise ValueError(f"no bitrate for height {unknown[0]} (heights: {known})")
        if len(set(value)) != len(value):
            raise ValueError("a height is listed twice")
        return sorted(value, reverse=True)

    @field_validator("output")
    @classmethod
    def _folder(cls, value: str) -> str:
        if PurePosixPath(value).suffix.lower() in (".mp4", ".mkv", ".mov", ".m4v", ".ts", ".m3u8"):
            raise ValueError(f"a ladder's output is a folder, not a file: {value!r}")
        return value


def parse_renditions(text: str) -> list[int]:
    """`"1080,720,480"` -> [1080, 720, 480]; ValueError with one line for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ladder takes heights like 1080,720,480, got {text!r}") from None


def default_output(input: PurePosixPath, package: Package) -> PurePosixPath:
    """`in/talk.mp4` -> `in/talk.hls` (`.dash`, `.mp4s`) beside it."""
    if package == "mp4":
        return input.with_name(f"{input.stem}.mp4s")
    return input.with_name(f"{input.stem}.{package}")


def make_spec(values: dict[str, Any]) -> LadderSpec:
    """A checked LadderSpec; InvalidSpec (one line naming the field) when it is not."""
    try:
        return LadderSpec.model_validate(values)
    except ValidationError as exc:
        raise InvalidSpec.from_validation(exc) from None


def enqueue(spec: LadderSpec, store: JobStore, app: Celery) -> str:
    """Record a ladder job and send it to the transcode queue; its id. The store and app are
    handed in by the caller (Client.enqueue_ladder), as the batch code is."""
    job_id = new_job_id()
    dumped = spec.model_dump(mode="json")
    queue = shared_transcode_queue(spec.gpu)  # a ladder that requires a GPU: GPU workers only
    store.create(JobRecord(
        id=job_id, kind=JobKind.TRANSCODE, state=JobState.QUEUED, spec=dumped,
        queue=queue, created_at=time.time(),
    ))  # fmt: skip
    try:
        app.send_task(
            TRANSCODE_TASK, args=[job_id, dumped], task_id=job_id, queue=queue,
            argsrepr=f"{spec.input} -> {spec.output} | ladder {spec.renditions} {spec.package}",
            priority=broker_priority(spec.priority),
        )  # fmt: skip
    except Exception:
        store.delete(job_id)  # never leave a record for a job no queue holds
        raise
    return job_id


def prepare(
    client: Client,
    input: str | Path,
    output: str | Path | None,
    copy_outside: bool,
    **params: Any,
) -> tuple[LadderSpec, Path | None]:
    """Check a ladder without changing anything: its spec, and the file to copy into the media
    root first (None when the input lies under it). InvalidSpec (one line) if bad, or if it
    requires a GPU and no live worker has one."""
    values = {k: v for k, v in params.items() if v is not None}
    make_spec({**values, "input": "in.mp4", "output": "out"})  # the parameters first
    source, copy_from, _ = client.input_path(input, copy_outside)  # a transcode's checks
    if output is None:
        output_rel = default_output(PurePosixPath(source), values.get("package", "hls")).as_posix()
    else:
        output_rel = media_relative(Path(output), client.settings.media, "output")
    spec = make_spec({**values, "input": source, "output": output_rel})
    require_gpu_worker(spec.gpu, client.heartbeats, None, None)  # as a transcode's submit
    return spec, copy_from


def enqueue_prepared(client: Client, spec: LadderSpec, copy_from: Path | None = None) -> Job:
    """Copy the input in if needed, record the ladder job and queue it."""
    if copy_from is not None:
        copy_file(copy_from, client.settings.media / spec.input)
    return Job(enqueue(spec, client.store, client.app), client)


def submit_ladder(
    input: str | Path,
    output: str | Path | None = None,
    *,
    renditions: list[int] | None = None,
    package: Package | None = None,
    segment_s: float | None = None,
    preset: Preset | None = None,
    cq: int | None = None,
    audio: LadderAudio | None = None,
    threads: int | None = None,
    priority: int | None = None,
    gpu: GpuPolicy | None = None,
    split: SplitSetting | None = None,
    copy_outside: bool = False,
    client: Client | None = None,
) -> Job:
    """Queue an ABR ladder of `input` and return its Job. None means the default.

    output: a folder under the media root, default `<input stem>.hls` (or `.dash`, `.mp4s`)
    beside the input; it appears whole once every playlist is written. renditions: heights in
    pixels, default 1080, 720, 480 (those above the source's are skipped). package: hls
    (default), dash or mp4. segment_s: seconds per segment, default 4. preset, cq (default 23,
    capped by the bitrate table), threads, priority, gpu: as for submit_transcode. audio: aac
    (default) or none. split: None, N or "auto": the ladder of each of N pieces made by its own
    worker, then packaged as one. client: the Client to use (default: a new one, settings from
    GPUJOBS_*). Raises InvalidSpec (one line: what is wrong), BrokerUnreachable.
    """
    params = {
        "renditions": renditions, "package": package, "segment_s": segment_s,
        "preset": preset, "cq": cq, "audio": audio, "threads": threads,
        "priority": priority, "gpu": gpu, "split": split,
    }  # fmt: skip
    client = client or Client()
    return enqueue_prepared(client, *prepare(client, input, output, copy_outside, **params))
