"""The ffmpeg side of a transcode: which path, the exact command, running it with progress,
and checking what it wrote.

The three paths, fastest first:
  nvenc        NVDEC decode, scale_cuda, NVENC encode (the command teams run today);
  cuda-decode  NVDEC decode, scale_cuda, hwdownload, libx264/libx265 (a GPU without NVENC);
  cpu          software decode, scale, libx264/libx265 (no GPU).
On the CPU encoders the NVENC preset maps to the x264/x265 preset of about the same speed rank
(p1 -> ultrafast ... p7 -> slow) and cq maps to crf with the same number.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gpujobs.media import MediaInfo
from gpujobs.specs import TranscodeSpec
from workers.gpu.discovery import Capabilities

X264_PRESETS = {
    "p1": "ultrafast",
    "p2": "superfast",
    "p3": "veryfast",
    "p4": "faster",
    "p5": "fast",
    "p6": "medium",
    "p7": "slow",
}
CPU_ENCODERS = {"h264": "libx264", "hevc": "libx265"}
NVENC_ENCODERS = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
# Added to every command we run: progress as key=value blocks on stdout, no banner, no stdin.
PROGRESS_ARGS = ["-hide_banner", "-nostdin", "-progress", "pipe:1", "-nostats"]
STDERR_TAIL_LINES = 20


# ffmpeg stderr that means "try again later", not "this input is bad": the card ran out of memory
# or NVENC sessions (GeForce session limit: "incompatible client key" / "out of memory").
TRANSIENT_ERRORS = (
    "out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "OpenEncodeSessionEx failed",
    "incompatible client key",
    "CUDA_ERROR_NO_DEVICE",
    "CUDA_ERROR_LAUNCH_FAILED",
)


def is_transient(stderr_tail: list[str]) -> bool:
    """True when ffmpeg failed for a reason a later attempt may not meet."""
    text = "\n".join(stderr_tail).lower()
    return any(pattern.lower() in text for pattern in TRANSIENT_ERRORS)


class EncodePath(StrEnum):
    NVENC = "nvenc"
    CUDA_DECODE = "cuda-decode"
    CPU = "cpu"


class NoGpuPath(Exception):
    """The spec requires a GPU path and this worker has none."""


def choose_path(spec: TranscodeSpec, caps: Capabilities) -> EncodePath:
    """The fastest path this worker's card supports that the spec allows."""
    if spec.gpu == "forbid":
        return EncodePath.CPU
    if caps.cuda_decode and caps.scale_cuda:
        return EncodePath.NVENC if caps.nvenc else EncodePath.CUDA_DECODE
    if spec.gpu == "require":
        raise NoGpuPath("the job requires a GPU and this worker has none that decodes with CUDA")
    return EncodePath.CPU


def output_size(spec: TranscodeSpec, source: MediaInfo) -> tuple[int, int]:
    """Width and height of the output; a missing width keeps the aspect ratio, rounded to even."""
    if spec.width is not None:
        return spec.width, spec.height
    width = round(source.width * spec.height / source.height / 2) * 2
    return max(width, 2), spec.height


def build_command(
    ffmpeg: str,
    spec: TranscodeSpec,
    path: EncodePath,
    input_file: str,
    output_file: str,
    width: int,
    height: int,
) -> list[str]:
    """The ffmpeg argument list for one path. No shell ever sees it."""
    args = [ffmpeg]
    if path is not EncodePath.CPU:
        args += ["-hwaccel", "cuda", "-hwaccel_output_format", "cuda"]
    args += ["-threads", str(spec.threads), "-i", input_file]
    if path is EncodePath.NVENC:
        args += ["-vf", f"scale_cuda={width}:{height}"]
        args += ["-c:v", NVENC_ENCODERS[spec.codec], "-preset", spec.preset, "-cq", str(spec.cq)]
    else:
        if path is EncodePath.CUDA_DECODE:
            # Scale on the card, then bring 8-bit 4:2:0 frames to the CPU encoder.
            video_filter = f"scale_cuda={width}:{height}:format=yuv420p,hwdownload,format=yuv420p"
        else:
            video_filter = f"scale={width}:{height},format=yuv420p"
        args += ["-vf", video_filter]
        args += [
            "-c:v", CPU_ENCODERS[spec.codec],
            "-preset", X264_PRESETS[spec.preset],
            "-crf", str(spec.cq),
        ]  # fmt: skip
    if spec.audio == "copy":
        args += ["-c:a", "copy"]
    elif spec.audio == "aac":
        args += ["-c:a", "aac", "-b:a", "128k"]
    else:
        args += ["-an"]
    args += ["-y", output_file]
    return args


def with_progress(command: list[str]) -> list[str]:
    """The command with PROGRESS_ARGS right after the binary."""
    return [command[0], *PROGRESS_ARGS, *command[1:]]


@dataclass(frozen=True)
class ProgressSample:
    """One `-progress` block. out_time_s: seconds of output written; speed: x real time."""

    out_time_s: float
    fps: float | None
    speed: float | None
    done: bool


def parse_progress_block(block: dict[str, str]) -> ProgressSample:
    def number(key: str, suffix: str = "") -> float | None:
        raw = block.get(key, "").strip().removesuffix(suffix)
        try:
            return float(raw)
        except ValueError:
            return None

    out_us = number("out_time_us")
    if out_us is None:
        out_us = number("out_time_ms")  # older ffmpeg builds: also microseconds, despite the name
    return ProgressSample(
        out_time_s=max(0.0, (out_us or 0.0) / 1_000_000),
        fps=number("fps"),
        speed=number("speed", "x"),
        done=block.get("progress") == "end",
    )


@dataclass
class RunOutcome:
    """How ffmpeg ended. returncode is None when it was stopped on request."""

    returncode: int | None
    stderr_tail: list[str]
    stopped: bool


# prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills ffmpeg when the worker that started it
# dies. ffmpeg runs in its own session (so a cancel can kill its group), which also means a
# SIGKILLed or OOM-killed worker would otherwise leave it running on the GPU, orphaned.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the forked child before exec: async-signal-safe, one system call, no locks."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stale_temporaries(output: Path, job_id: str) -> list[Path]:
    """Temporary outputs that earlier attempts of this job left beside `output`."""
    return list(output.parent.glob(f".{output.stem}.{job_id}.*.part{output.suffix}"))


def run_ffmpeg(
    command: list[str],
    on_progress: Callable[[ProgressSample], None],
    should_stop: Callable[[], bool],
    check_every_s: float = 0.25,
) -> RunOutcome:
    """Run ffmpeg in its own process group, report each progress block, and kill the whole
    group when `should_stop()` turns true (checked about every `check_every_s` seconds)."""
    proc = subprocess.Popen(
        with_progress(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: a cancel kills it and its children
        preexec_fn=_die_with_parent,  # see _die_with_parent
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    blocks: queue.Queue[dict[str, str] | None] = queue.Queue()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)

    def read_progress() -> None:
        assert proc.stdout is not None
        block: dict[str, str] = {}
        for raw in proc.stdout:
            key, _, value = raw.decode(errors="replace").strip().partition("=")
            block[key] = value
            if key == "progress":
                blocks.put(block)
                block = {}
        blocks.put(None)

    readers = [
        threading.Thread(target=read_stderr, daemon=True),
        threading.Thread(target=read_progress, daemon=True),
    ]
    for reader in readers:
        reader.start()
    stopped = False
    try:
        while True:
            try:
                block = blocks.get(timeout=check_every_s)
            except queue.Empty:
                block = {}
            if block is None:
                break
            if block:
                on_progress(parse_progress_block(block))
            if should_stop():
                stopped = True
                break
    finally:
        if stopped or proc.poll() is None:
            kill_group(proc)  # stopped on request, or our loop raised: never leave ffmpeg behind
    returncode = proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    return RunOutcome(
        returncode=None if stopped else returncode, stderr_tail=list(tail), stopped=stopped
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ffmpeg's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def temporary_output(output: Path, job_id: str) -> Path:
    """A hidden name beside the output, same extension so ffmpeg picks the same muxer."""
    return output.with_name(f".{output.stem}.{job_id}.part{output.suffix}")


def duration_tolerance_s(duration_s: float) -> float:
    """1% of the input's duration, at least 0.1 s (a few frames) for clips of seconds."""
    return max(0.01 * duration_s, 0.1)


def validate_output(
    result: MediaInfo, source: MediaInfo, spec: TranscodeSpec, width: int, height: int
) -> str | None:
    """None when the output is what the spec asked for, else one line saying what is wrong."""
    if result.video_codec != spec.codec:
        return f"output video codec is {result.video_codec}, expected {spec.codec}"
    if (result.width, result.height) != (width, height):
        return f"output is {result.width}x{result.height}, expected {width}x{height}"
    tolerance = duration_tolerance_s(source.duration_s)
    if abs(result.duration_s - source.duration_s) > tolerance:
        return (
            f"output lasts {result.duration_s:.2f} s, input {source.duration_s:.2f} s "
            f"(tolerance {tolerance:.2f} s)"
        )
    if spec.audio != "none" and source.has_audio and not result.has_audio:
        return "output has no audio stream, the input has one"
    if spec.audio == "copy" and source.has_audio and result.audio_codec != source.audio_codec:
        return f"output audio is {result.audio_codec}, the input's {source.audio_codec} was copied"
    return None


class Throttle:
    """Lets an update through at most every `interval_s` seconds; `force` always passes."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False
