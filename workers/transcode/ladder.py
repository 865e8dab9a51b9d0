"""An ABR ladder from one decode: the input is decoded once, `split` feeds one scaler and one
encoder per rendition, and ffmpeg's HLS (fMP4) or DASH muxer writes every rendition's segments
and the playlists. Keyframes are aligned across renditions (a fixed GOP of one segment and a
keyframe forced at every segment boundary), so a player can switch at any segment.

The paths, as for a single transcode (workers/transcode/command.py):
  nvenc        -hwaccel cuda decode, split, scale_cuda + h264_nvenc per rendition (one NVENC
               session each, every one counted against the node's NVENC budget);
  cuda-decode  -hwaccel cuda decode, split, scale_cuda + hwdownload + libx264 per rendition;
  cpu          software decode, split, scale + libx264 per rendition.

The folder is written under a hidden name, checked (every variant read back with PyAV, the same
frames as the source, keyframes at the same times in every rendition, the playlists complete),
then renamed into place: a player never sees a ladder with a playlist missing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from celery import Celery
from pydantic import ValidationError

from gpujobs.ladder import AUDIO_KBPS, BITRATE_CAP_KBPS, ENTRY_FILES, LadderSpec
from gpujobs.media import ProbeError, StreamInfo, probe
from gpujobs.specs import JobRecord, JobState
from workers.gpu import nvenc
from workers.gpu.discovery import Capabilities
from workers.lease import LeaseKeeper
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime
from workers.transcode import command as tc
from workers.transcode.job import TranscodeAttempt
from workers.transcode.split import StreamFacts, read_facts

log = logging.getLogger(__name__)
EncodePath = tc.EncodePath


@dataclass(frozen=True)
class Rendition:
    """One rung: height and width in pixels (even, the source's aspect), the capped video
    bitrate in kbit/s (BITRATE_CAP_KBPS), and its name in the folder (`720p`)."""

    height: int
    width: int
    maxrate_kbps: int

    @property
    def name(self) -> str:
        return f"{self.height}p"

    @property
    def bufsize_kbps(self) -> int:
        """The VBV buffer: two seconds at the cap."""
        return 2 * self.maxrate_kbps


def read_video(path: Path) -> StreamInfo:
    """The main video of `path` as gpujobs.media's probe reads it (displayed size, turn,
    mirror, interlacing). Raises ProbeError (unreadable) or ValueError (no video stream)."""
    video = probe(path).video
    if video is None:
        raise ValueError("no video stream")
    return video


def shown_height(video: StreamInfo) -> int:
    """The picture's height as shown (SAR applied, turned upright), in whole pixels."""
    return round(video.display_size[1])


def plan_renditions(heights: list[int], video: StreamInfo) -> list[Rendition]:
    """The rungs to encode, largest first: every height at or below the picture's as shown (an
    upscaled rung would only waste bits); widths keep its displayed aspect, rounded to even
    (a portrait phone clip at 480: 270x480; 720x480 at SAR 32:27: 854x480)."""
    width, height = video.display_size
    return [
        Rendition(h, max(2, round(width * h / height / 2) * 2), BITRATE_CAP_KBPS[h])
        for h in sorted(heights, reverse=True)
        if h <= shown_height(video)
    ]


def choose_path(spec: LadderSpec, caps: Capabilities) -> EncodePath:
    """The fastest path the card supports that the spec allows (tc.NoGpuPath if required and
    missing)."""
    if spec.gpu == "forbid":
        return EncodePath.CPU
    if caps.cuda_decode and caps.scale_cuda:
        return EncodePath.NVENC if caps.nvenc else EncodePath.CUDA_DECODE
    if spec.gpu == "require":
        raise tc.NoGpuPath("the job requires a GPU and this worker has none that decodes with CUDA")
    return EncodePath.CPU


def nvenc_sessions(path: EncodePath, renditions: list[Rendition]) -> int:
    """NVENC sessions the ladder holds while it runs: one per rendition on the NVENC path."""
    return len(renditions) if path is EncodePath.NVENC else 0


def gop_frames(fps: float, segment_s: float) -> int:
    """Frames per GOP: exactly one segment, so every segment starts on a keyframe."""
    return max(1, round(fps * segment_s))


def filter_graph(path: EncodePath, renditions: list[Rendition], video: StreamInfo) -> str:
    """`[0:v]bwdif,transpose,...,split=N[s0]...;[s0]scale...[v0];...`: one decode, made upright
    and progressive once (`command.upright`), feeding one scaler per rung. The scalers keep
    the display aspect exact through the sample aspect ratio (426x240 of a 16:9 source has SAR
    640:639): DASH wants one display aspect per adaptation set."""
    n = len(renditions)
    before = tc.upright(video.rotation, video.interlaced, on_gpu=path is not EncodePath.CPU,
                        mirrored=video.mirrored)  # fmt: skip
    parts = ["[0:v]" + "".join(f"{step}," for step in before) + f"split={n}"
             + "".join(f"[s{i}]" for i in range(n))]  # fmt: skip
    for i, r in enumerate(renditions):
        if path is EncodePath.NVENC:
            scale = f"scale_cuda={r.width}:{r.height}"
        elif path is EncodePath.CUDA_DECODE:
            scale = f"scale_cuda={r.width}:{r.height}:format=yuv420p,hwdownload,format=yuv420p"
        else:
            scale = f"scale={r.width}:{r.height},format=yuv420p"
        parts.append(f"[s{i}]{scale}[v{i}]")
    return ";".join(parts)


def build_command(
    ffmpeg: str,
    spec: LadderSpec,
    path: EncodePath,
    input_file: str,
    folder: Path,
    renditions: list[Rendition],
    fps: float,
    has_audio: bool,
    video: StreamInfo,
    copy_audio: bool = False,
) -> list[str]:
    """The ffmpeg argument list for a ladder written into `folder`. No shell ever sees it.
    copy_audio: the source's audio is AAC already: copy it rather than encode it again."""
    audio = has_audio and spec.audio == "aac"
    args = [ffmpeg]
    if path is not EncodePath.CPU:
        args += ["-hwaccel", "cuda", "-hwaccel_output_format", "cuda"]
    # The turn is the filter graph's (`upright`), on every path alike.
    args += ["-noautorotate", "-threads", str(spec.threads), "-i", input_file]
    args += ["-filter_complex", filter_graph(path, renditions, video)]
    if spec.package == "mp4":  # one output file per rendition, each with its own options
        for i, r in enumerate(renditions):
            args += ["-map", f"[v{i}]", *(["-map", "0:a:0"] if audio else [])]
            args += video_args(spec, path, [r], fps)
            args += audio_args(copy_audio) if audio else ["-an"]
            args += ["-y", str(folder / f"{r.name}.mp4")]
        return args
    for i in range(len(renditions)):
        args += ["-map", f"[v{i}]"]
    audio_maps = audio_streams(spec, renditions) if audio else 0
    for _ in range(audio_maps):
        args += ["-map", "0:a:0"]
    args += video_args(spec, path, renditions, fps)
    if audio_maps:
        args += audio_args(copy_audio)
    return args + package_args(spec, folder, renditions, audio)


def audio_streams(spec: LadderSpec, renditions: list[Rendition]) -> int:
    """HLS: each variant carries its own audio; DASH: one audio set all renditions share."""
    return len(renditions) if spec.package == "hls" else 1


def audio_args(copy: bool = False) -> list[str]:
    """AAC for every rendition: the source's copied when it is AAC, else encoded (stereo)."""
    return ["-c:a", "copy"] if copy else ["-c:a", "aac", "-b:a", f"{AUDIO_KBPS}k", "-ac", "2"]


def video_args(
    spec: LadderSpec, path: EncodePath, renditions: list[Rendition], fps: float
) -> list[str]:
    """One encoder per rendition (on the GPU: one NVENC session each), a GOP of one segment,
    keyframes forced at segment boundaries, the bitrate capped per rendition."""
    gop = gop_frames(fps, spec.segment_s)
    encoder = "h264_nvenc" if path is EncodePath.NVENC else "libx264"
    args: list[str] = []
    for i in range(len(renditions)):
        args += [f"-c:v:{i}", encoder]
    if path is EncodePath.NVENC:
        args += ["-preset", spec.preset, "-rc", "vbr", "-cq", str(spec.cq)]
        args += ["-g", str(gop), "-forced-idr", "1", "-no-scenecut", "1"]
    else:
        args += ["-preset", tc.X264_PRESETS[spec.preset], "-crf", str(spec.cq)]
        args += ["-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0"]
    args += ["-force_key_frames", f"expr:gte(t,n_forced*{spec.segment_s:g})"]
    for i, r in enumerate(renditions):
        args += [f"-maxrate:v:{i}", f"{r.maxrate_kbps}k", f"-bufsize:v:{i}", f"{r.bufsize_kbps}k"]
    return args


def package_args(
    spec: LadderSpec, folder: Path, renditions: list[Rendition], audio: bool
) -> list[str]:
    """The HLS or DASH muxer writing into `folder` (video streams first, then audio)."""
    if spec.package == "hls":
        streams = [
            f"v:{i},a:{i},name:{r.name}" if audio else f"v:{i},name:{r.name}"
            for i, r in enumerate(renditions)
        ]
        return [
            "-f", "hls", "-hls_time", f"{spec.segment_s:g}", "-hls_playlist_type", "vod",
            "-hls_segment_type", "fmp4", "-hls_flags", "independent_segments",
            "-hls_segment_filename", str(folder / "%v" / "seg%05d.m4s"),
            "-master_pl_name", ENTRY_FILES["hls"], "-var_stream_map", " ".join(streams),
            "-y", str(folder / "%v" / "index.m3u8"),
        ]  # fmt: skip
    sets = "id=0,streams=v id=1,streams=a" if audio else "id=0,streams=v"
    return [
        "-f", "dash", "-seg_duration", f"{spec.segment_s:g}", "-use_template", "1",
        "-use_timeline", "0", "-adaptation_sets", sets,
        "-init_seg_name", "init-$RepresentationID$.m4s",
        "-media_seg_name", "chunk-$RepresentationID$-$Number%05d$.m4s",
        "-y", str(folder / ENTRY_FILES["dash"]),
    ]  # fmt: skip


def hold_slots(slots: nvenc.NvencSemaphore, job_id: str, count: int) -> ExitStack:
    """Take `count` of the node's NVENC slots for one ladder, all or none: NoNvencSlot (and
    nothing held) when fewer are free. Close the returned stack to give them back."""
    stack = ExitStack()
    delivery = uuid.uuid4().hex[:8]
    try:
        for i in range(count):
            stack.enter_context(slots.slot(f"{job_id}:{delivery}:r{i}"))
    except BaseException:
        stack.close()
        raise
    return stack


@contextlib.contextmanager
def job_slots(task: Any, rt: WorkerRuntime, job_id: str, spec: dict[str, Any]) -> Iterator[None]:
    """Around one delivery of a ladder job on the NVENC path: hold one NVENC slot per rendition
    it will encode (renditions above the source's height take none). When too few are free, the
    job goes back to its queue through Celery's retry, as a single transcode does
    (nvenc.job_slot), with nothing held."""
    record = rt.store.get(job_id)
    try:
        ladder = LadderSpec.model_validate(spec)
        path = choose_path(ladder, rt.capabilities)
        video = read_video(rt.media_path(ladder.input))
        count = nvenc_sessions(path, plan_renditions(ladder.renditions, video))
    except (tc.NoGpuPath, ValidationError, PathOutsideMediaRoot, ProbeError, ValueError, OSError):
        count = 0  # the job body records why it cannot run
    if count == 0 or record is None or record.state.terminal:
        yield
        return
    try:
        stack = hold_slots(nvenc.semaphore(rt), job_id, count)
    except nvenc.NoNvencSlot as exc:
        log.info("ladder %s waits for %d NVENC sessions: %s", job_id, count, exc)
        raise task.retry(countdown=rt.settings.nvenc_wait_s, max_retries=nvenc.UNLIMITED) from None
    with stack:
        yield


def run_ladder(rt: WorkerRuntime, app: Celery, job_id: str, worker: str) -> dict[str, Any]:
    """One delivery of a ladder job (claimed, leased and fenced like any transcode)."""
    claim = rt.leases.claim(job_id, worker, rt.settings.node_name, rt.gpu_label)
    if not claim.claimed:
        return {"skipped": claim.outcome}
    record = rt.store.get(job_id)
    assert record is not None
    with LeaseKeeper(rt.leases, job_id, claim.token) as keeper:
        return LadderAttempt(rt, app, record, claim.attempt, keeper, worker).run()


class LadderAttempt(TranscodeAttempt):
    """One attempt at a ladder: its record writes, failure and stop handling are a transcode's."""

    def __init__(
        self,
        rt: WorkerRuntime,
        app: Celery,
        record: JobRecord,
        attempt: int,
        keeper: LeaseKeeper,
        worker: str,
    ) -> None:
        self.rt, self.app, self.store = rt, app, rt.store
        self.job_id = record.id
        self.ladder = LadderSpec.model_validate(record.spec)
        self.attempt, self.keeper, self.worker = attempt, keeper, worker
        self.started_at = time.time()
        self._later: dict[str, Any] = {}  # as TranscodeAttempt: fields held for the next write

    def run(self) -> dict[str, Any]:
        rt, spec = self.rt, self.ladder
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        try:
            source = read_facts(source_path)
            video = read_video(source_path)
        except (av.FFmpegError, ProbeError, ValueError, OSError) as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc}")
        renditions = plan_renditions(spec.renditions, video)
        if not renditions:
            asked = ", ".join(str(h) for h in spec.renditions)
            return self.fail(
                f"every rendition ({asked}) is above the source's {shown_height(video)}p"
            )
        try:
            path = choose_path(spec, rt.capabilities)
        except tc.NoGpuPath as exc:
            return self.fail(str(exc))
        output_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in output_path.parent.glob(f".{output_path.name}.{self.job_id}.*.part"):
            shutil.rmtree(stale, ignore_errors=True)  # an earlier attempt died mid-write
        temp = output_path.with_name(f".{output_path.name}.{self.job_id}.{self.attempt}.part")
        temp.mkdir()
        command = build_command(
            rt.ffmpeg, spec, path, str(source_path), temp, renditions, 1 / source.frame_s,
            source.audio_end_s is not None, video, copy_audio=source.audio_codec == "aac",
        )  # fmt: skip
        self.update(encode_path=path.value)
        log.info("ladder %s attempt %d: %s", self.job_id, self.attempt, " ".join(command))
        throttle = tc.Throttle(rt.settings.progress_interval_s)
        stop_check = tc.Throttle(0.5)
        began = time.monotonic()

        def on_progress(sample: tc.ProgressSample) -> None:
            if throttle.ready(force=sample.done):
                percent = min(100.0, 100.0 * sample.out_time_s / source.video_end_s)
                left = max(0.0, source.video_end_s - sample.out_time_s)
                eta = round(left / sample.speed, 1) if sample.speed else None
                self.update(percent=round(percent, 1), fps=sample.fps, speed=sample.speed,
                            eta_s=eta)  # fmt: skip

        try:
            outcome = tc.run_ffmpeg(
                command, on_progress, lambda: stop_check.ready() and self.should_stop()
            )
            if outcome.stopped:
                return self.stopped()
            if outcome.returncode != 0:
                tail = " | ".join(outcome.stderr_tail[-3:]) or "no output"
                reason = f"ffmpeg exited with {outcome.returncode}: {tail}"
                if tc.is_transient(outcome.stderr_tail):
                    return self.retry_later(reason)
                return self.fail(reason)
            try:
                keyframes = check_ladder(temp, spec, renditions, source)
            except LadderInvalid as exc:
                return self.fail(f"ladder failed validation: {exc}")
            if self.should_stop():
                return self.stopped()
            replace_folder(temp, output_path, f"{self.job_id}.{self.attempt}")
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        summary = {
            "output": spec.output,
            "entry": f"{spec.output}/{ENTRY_FILES[spec.package]}".rstrip("/"),
            "package": spec.package,
            "renditions": [
                {
                    "name": r.name,
                    "width": r.width,
                    "height": r.height,
                    "maxrate_kbps": r.maxrate_kbps,
                }
                for r in renditions
            ],
            "skipped_heights": [h for h in spec.renditions if h > shown_height(video)],
            "rotated": video.rotation,
            "deinterlaced": video.interlaced,
            "segment_s": spec.segment_s,
            "keyframes": len(keyframes),
            "frames": source.frames,
            "nvenc_sessions": nvenc_sessions(path, renditions),
            "encode_path": path.value,
            "elapsed_s": round(time.monotonic() - began, 3),
        }
        if self.update(state=JobState.SUCCEEDED, percent=100.0, eta_s=0, output=spec.output,
                       result=summary):  # fmt: skip
            self.history("succeeded")
        return summary


class LadderInvalid(Exception):
    """What is wrong with a written ladder, in one line."""


def replace_folder(temp: Path, output: Path, token: str) -> None:
    """Move the finished folder into place; an older ladder there is moved aside first, then
    removed, so a reader sees the old ladder or the new one, never half of either."""
    if output.exists():
        aside = output.with_name(f".{output.name}.{token}.old")
        output.rename(aside)
        temp.rename(output)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        temp.rename(output)


def variant_facts(folder: Path, spec: LadderSpec, renditions: list[Rendition]) -> list[StreamFacts]:
    """Every rendition read back with PyAV: HLS through its media playlist; DASH from its init
    segment and media segments joined (the wheels' FFmpeg has no DASH demuxer)."""
    facts = []
    if spec.package == "mp4":
        return [read_facts(folder / f"{r.name}.mp4") for r in renditions]
    if spec.package == "hls":
        master = (folder / ENTRY_FILES["hls"]).read_text()
        for r in renditions:
            line = next(
                (x for x in master.splitlines() if f"RESOLUTION={r.width}x{r.height}" in x), ""
            )
            if not all(f"{field}=" in line for field in ("BANDWIDTH", "RESOLUTION", "CODECS")):
                raise LadderInvalid(
                    f"master playlist lacks BANDWIDTH/RESOLUTION/CODECS for {r.name}"
                )
            facts.append(read_facts(folder / r.name / "index.m3u8"))
        return facts
    # The MPD is the one our own ffmpeg just wrote into our own folder: trusted input.
    mpd = ET.parse(folder / ENTRY_FILES["dash"]).getroot()  # noqa: S314
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    videos = [
        rep for rep in mpd.iterfind(".//d:Representation", ns)
        if rep.get("mimeType", "").startswith("video/")
    ]  # fmt: skip
    if len(videos) != len(renditions):
        raise LadderInvalid(
            f"the MPD lists {len(videos)} video representations, not {len(renditions)}"
        )
    with tempfile.TemporaryDirectory() as scratch:
        for rep in videos:
            rid = rep.get("id", "")
            joined = Path(scratch) / f"rep{rid}.mp4"
            with joined.open("wb") as out:
                out.write((folder / f"init-{rid}.m4s").read_bytes())
                for chunk in sorted(folder.glob(f"chunk-{rid}-*.m4s")):
                    out.write(chunk.read_bytes())
            facts.append(read_facts(joined))
    return facts


def check_ladder(
    folder: Path, spec: LadderSpec, renditions: list[Rendition], source: StreamFacts
) -> list[float]:
    """Read every variant back; LadderInvalid unless each has the planned size and the source's
    frames and all have keyframes at the same times. Returns those keyframe times."""
    try:
        variants = variant_facts(folder, spec, renditions)
    except (av.FFmpegError, OSError, ValueError, ET.ParseError) as exc:
        raise LadderInvalid(f"a variant cannot be read: {exc}") from None
    first = variants[0].keyframes
    for r, facts in zip(renditions, variants, strict=True):
        if (facts.width, facts.height) != (r.width, r.height):
            raise LadderInvalid(
                f"{r.name} is {facts.width}x{facts.height}, not {r.width}x{r.height}"
            )
        if facts.frames != source.frames:
            raise LadderInvalid(f"{r.name} has {facts.frames} frames, the source {source.frames}")
        if [round(k, 3) for k in facts.keyframes] != [round(k, 3) for k in first]:
            raise LadderInvalid(
                f"{r.name}'s keyframes are not at the same times as {renditions[0].name}'s"
            )
    expected = int(source.video_end_s // spec.segment_s)
    if len(first) < expected:
        raise LadderInvalid(
            f"{len(first)} keyframes, expected one per {spec.segment_s:g} s segment"
        )
    return first
