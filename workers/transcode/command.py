"""The ffmpeg side of a transcode: which path, the exact command, running it with progress.

The three paths, fastest first:
  nvenc        NVDEC decode, CUDA filters, NVENC encode (the command teams run today);
  cuda-decode  NVDEC decode, CUDA filters, hwdownload, libx264/libx265 (a GPU without NVENC);
  cpu          software decode and filters, libx264/libx265 (no GPU).
Every path applies the same picture rules (workers/transcode/plan.py): deinterlace (bwdif, or
bwdif_cuda on the card), turn upright (transpose, or transpose_cuda; the display matrix is then
removed so players do not turn it again), scale to the displayed size, square pixels (setsar=1).
Where NVDEC cannot decode the input (H.264 wider or taller than 4096, 4:2:2 or 10-bit H.264, a
codec it lacks), the job decodes on the CPU and still encodes with NVENC (the nvenc path), or
runs the cpu path (instead of cuda-decode); the reason is recorded in the job's result.

CPU presets: the NVENC preset maps to the x264/x265 preset of about the same rank, one step
slower at the fast end, so that no default gives a Baseline-profile file (x264's ultrafast turns
off CABAC and B-frames): p1 superfast, p2 veryfast, p3 faster, p4 fast, p5 medium, p6 slow,
p7 slower. cq maps to crf with the same number.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import glob
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from gpujobs.media import StreamInfo
from gpujobs.specs import TranscodeSpec
from workers.gpu.discovery import Capabilities
from workers.transcode.plan import Plan, geometry

NAME_MAX = 255  # bytes in one file name (ext4, XFS, btrfs, NTFS through WSL2)

X264_PRESETS = {
    "p1": "superfast",
    "p2": "veryfast",
    "p3": "faster",
    "p4": "fast",
    "p5": "medium",
    "p6": "slow",
    "p7": "slower",
}
CPU_ENCODERS = {"h264": "libx264", "hevc": "libx265"}
NVENC_ENCODERS = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
# Added to every command we run: progress as key=value blocks on stdout, no banner, no stdin, and
# each log line tagged with its level, so the line that explains a failure can be found.
PROGRESS_ARGS = ["-hide_banner", "-nostdin", "-loglevel", "level+info", "-progress", "pipe:1",
                 "-nostats"]  # fmt: skip
STDERR_TAIL_LINES = 20
# The job log keeps at most this many stderr lines from the start and as many from the end.
LOG_KEEP_LINES = 2000
# Containers whose index can be moved to the front for web playback, and that tag HEVC.
MOOV_CONTAINERS = ("mp4", "mov")

# What NVDEC decodes, and how large (NVIDIA's Video Codec SDK support matrix, Turing and later).
NVDEC_MAX = {"h264": 4096, "hevc": 8192, "vp9": 8192, "av1": 8192, "mpeg2video": 4080,
             "mpeg1video": 4080, "mpeg4": 2032, "vc1": 2048, "vp8": 4096,
             "mjpeg": 32768}  # fmt: skip
NVDEC_H264_FORMATS = frozenset({"yuv420p", "yuvj420p", "nv12"})


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


def nvdec_refusal(video: StreamInfo) -> str | None:
    """Why NVDEC cannot decode this stream (None when it can)."""
    limit = NVDEC_MAX.get(video.codec)
    if limit is None:
        return f"NVDEC does not decode {video.codec}"
    if video.width > limit or video.height > limit:
        return (f"NVDEC decodes {video.codec} up to {limit}x{limit}; "
                f"this is {video.width}x{video.height}")  # fmt: skip
    if video.codec == "h264" and video.pix_fmt not in NVDEC_H264_FORMATS:
        return f"NVDEC decodes 8-bit 4:2:0 H.264 only; this is {video.pix_fmt}"
    if video.codec == "hevc" and video.pix_fmt and "422" in video.pix_fmt:
        return f"NVDEC decodes 4:2:2 HEVC on Blackwell cards only; this is {video.pix_fmt}"
    return None


@dataclass(frozen=True)
class Route:
    """How one job runs: the encode path, where it decodes, and why it does not decode on the
    card when the path would (None otherwise)."""

    path: EncodePath
    gpu_decode: bool
    fallback: str | None = None


def route(path: EncodePath, video: StreamInfo) -> Route:
    """The path adjusted to what NVDEC can decode: nvenc decodes on the CPU instead; cuda-decode
    becomes the cpu path. The reason goes into the job's result."""
    if path is EncodePath.CPU:
        return Route(path, gpu_decode=False)
    refusal = nvdec_refusal(video)
    if refusal is None:
        return Route(path, gpu_decode=True)
    if path is EncodePath.NVENC:
        return Route(path, gpu_decode=False, fallback=f"CPU decode: {refusal}")
    return Route(EncodePath.CPU, gpu_decode=False, fallback=f"cpu path: {refusal}")


def output_size(spec: TranscodeSpec, video: StreamInfo) -> tuple[int, int]:
    """Width and height of the output from the displayed picture (see plan.geometry)."""
    g = geometry(spec, video)
    return g.width, g.height


_CPU_TURN = {90: "transpose=clock", 180: "hflip,vflip", 270: "transpose=cclock"}
_CUDA_TURN = {90: "transpose_cuda=dir=clock", 180: "transpose_cuda=dir=reversal",
              270: "transpose_cuda=dir=cclock"}  # fmt: skip
_DROP_MATRIX = "sidedata=mode=delete:type=DISPLAYMATRIX"


def upright(rotation: int, deinterlace: bool, on_gpu: bool, mirrored: bool = False) -> list[str]:
    """The filters that come before any scaling, on every path (a transcode's, a ladder's):
    deinterlace (`bwdif`; `bwdif_cuda` on frames in GPU memory), then show the picture as its
    display matrix says: flipped left to right first when the matrix mirrors it, then turned
    by `rotation` (clockwise, 0/90/180/270); then the matrix is dropped, so no player applies
    it again. Flip-then-turn is what ffmpeg's own autorotate shows for each of the eight
    matrices (tests/test_command.py checks them all). Used with `-noautorotate`: ffmpeg's
    autorotate cannot turn frames in GPU memory, so every path does it the same way here."""
    steps: list[str] = []
    if deinterlace:
        steps.append(f"bwdif{'_cuda' if on_gpu else ''}=mode=send_frame:parity=auto:deint=all")
    if mirrored:
        steps.append("transpose_cuda=dir=hflip" if on_gpu else "hflip")
    if rotation:
        steps.append((_CUDA_TURN if on_gpu else _CPU_TURN)[rotation])
    if rotation or mirrored:
        steps.append(_DROP_MATRIX)
    return steps


def video_filter(spec: TranscodeSpec, plan: Plan, route: Route) -> str:
    """The -vf chain for a path: deinterlace, turn upright, scale, square pixels, pixel format."""
    g = plan.geometry
    ten_bit_hevc = spec.codec == "hevc" and g.bit_depth > 8
    steps = upright(g.rotation, g.deinterlace, on_gpu=route.gpu_decode, mirrored=g.mirrored)
    if route.gpu_decode:
        if route.path is EncodePath.NVENC:
            # NVENC's H.264 takes 8-bit frames; HEVC keeps 10 bits (Main10).
            fmt = "p010le" if ten_bit_hevc else ("yuv420p" if g.bit_depth > 8 else "")
            steps.append(f"scale_cuda={g.width}:{g.height}" + (f":format={fmt}" if fmt else ""))
        else:
            fmt, cpu_fmt = ("p010le", "yuv420p10le") if ten_bit_hevc else ("yuv420p", "yuv420p")
            steps += [f"scale_cuda={g.width}:{g.height}:format={fmt}", "hwdownload",
                      f"format={fmt}"]  # fmt: skip
            if cpu_fmt != fmt:
                steps.append(f"format={cpu_fmt}")
    else:
        steps.append(f"scale={g.width}:{g.height}")
        if route.path is EncodePath.NVENC:
            steps.append("format=p010le" if ten_bit_hevc else "format=yuv420p")
        else:
            steps.append("format=yuv420p10le" if ten_bit_hevc else "format=yuv420p")
    steps.append("setsar=1")
    return ",".join(steps)


def build_command(
    ffmpeg: str,
    spec: TranscodeSpec,
    plan: Plan,
    route: Route,
    input_file: str,
    output_file: str,
) -> list[str]:
    """The ffmpeg argument list for one job. No shell ever sees it.

    The output file is written with -y: it is the attempt's own temporary name (the worker
    refuses an existing final output unless the spec allows overwriting).
    """
    args = [ffmpeg]
    if route.gpu_decode:
        args += ["-hwaccel", "cuda", "-hwaccel_output_format", "cuda"]
    # Rotation is applied by our own filters on every path (ffmpeg's autorotate skips frames
    # on the card), so the same input comes out the same way on every path.
    args += ["-noautorotate", "-threads", str(spec.threads), "-i", input_file]
    args += ["-map", f"0:v:{plan.video.kind_index}"]
    for choice in (*plan.audio, *plan.subtitles):
        args += ["-map", f"0:{choice.index}"]
    args += ["-vf", video_filter(spec, plan, route)]
    ten_bit_hevc = spec.codec == "hevc" and plan.geometry.bit_depth > 8
    if route.path is EncodePath.NVENC:
        args += ["-c:v", NVENC_ENCODERS[spec.codec], "-preset", spec.preset, "-cq", str(spec.cq)]
        if ten_bit_hevc:
            args += ["-profile:v", "main10"]
    else:
        args += [
            "-c:v", CPU_ENCODERS[spec.codec],
            "-preset", X264_PRESETS[spec.preset],
            "-crf", str(spec.cq),
        ]  # fmt: skip
    if spec.codec == "hevc" and plan.container in MOOV_CONTAINERS:
        args += ["-tag:v", "hvc1"]  # what Apple players require of HEVC in MP4/MOV
    for n, choice in enumerate(plan.audio):
        if choice.action == "kept":
            args += [f"-c:a:{n}", "copy"]
        else:
            args += [f"-c:a:{n}", "aac", f"-b:a:{n}", str(choice.bitrate)]
    for n, choice in enumerate(plan.subtitles):
        args += [f"-c:s:{n}", "copy" if choice.action == "kept" else str(choice.to)]
    if spec.fps is None:
        args += ["-fps_mode", "passthrough"]  # source timing kept, variable rates too
    else:
        args += ["-fps_mode", "cfr", "-r", f"{spec.fps:g}"]
    if plan.container in MOOV_CONTAINERS:
        args += ["-movflags", "+faststart"]
    args += ["-y", output_file]
    return args


@functools.cache
def ffmpeg_version(ffmpeg: str) -> str:
    """The build's version (`ffmpeg -version`'s first line, "ffmpeg version n9.0.2-..."): the
    word after "version", or "unknown"."""
    try:
        out = subprocess.run([ffmpeg, "-hide_banner", "-version"], capture_output=True,
                             text=True, timeout=30, check=False).stdout  # fmt: skip
    except OSError:
        return "unknown"
    words = out.split()
    return words[2] if len(words) > 2 and words[1] == "version" else "unknown"


def with_progress(command: list[str]) -> list[str]:
    """The command with PROGRESS_ARGS right after the binary."""
    return [command[0], *PROGRESS_ARGS, *command[1:]]


@dataclass(frozen=True)
class ProgressSample:
    """One `-progress` block. out_time_s: seconds of output written; frame: frames written;
    speed: x real time; read_fraction: how much of the input file ffmpeg has read (0..1, None
    when unknown): the measure of progress for inputs without a duration."""

    out_time_s: float
    fps: float | None
    speed: float | None
    done: bool
    frame: int | None = None
    read_fraction: float | None = None


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
    frame = number("frame")
    return ProgressSample(
        out_time_s=max(0.0, (out_us or 0.0) / 1_000_000),
        fps=number("fps"),
        speed=number("speed", "x"),
        done=block.get("progress") == "end",
        frame=None if frame is None else int(frame),
    )


@dataclass
class RunOutcome:
    """How ffmpeg ended. returncode is None when it was stopped on request. log: its stderr (the
    first and last LOG_KEEP_LINES lines, with a line saying how many were left out between)."""

    returncode: int | None
    stderr_tail: list[str]
    stopped: bool
    log: list[str] = field(default_factory=list)
    last: ProgressSample | None = None


class InputReadMeter:
    """How far a process has read a file, from /proc/<pid>/fdinfo (Linux; None elsewhere)."""

    def __init__(self, pid: int, path: Path) -> None:
        self.pid = pid
        self.path = str(path)
        self.size = path.stat().st_size if path.exists() else 0
        self._fd: str | None = None

    def fraction(self) -> float | None:
        if not self.size:
            return None
        with contextlib.suppress(OSError):
            if self._fd is None:
                for fd in os.listdir(f"/proc/{self.pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{self.pid}/fd/{fd}") == self.path:
                            self._fd = fd
                            break
            if self._fd is not None:
                with open(f"/proc/{self.pid}/fdinfo/{self._fd}") as info:
                    for line in info:
                        if line.startswith("pos:"):
                            return min(1.0, int(line.split()[1]) / self.size)
        return None


# prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills ffmpeg when the worker that started it
# dies. ffmpeg runs in its own session (so a cancel can kill its group), which also means a
# SIGKILLed or OOM-killed worker would otherwise leave it running on the GPU, orphaned.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the forked child before exec: async-signal-safe, one system call, no locks."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """util-linux's `setpriv --pdeathsig KILL --`, which sets the same signal and execs the
    command in its place (same pid, same process group), or () where it is missing.

    Why not `preexec_fn` alone: a preexec_fn makes Python fork the whole worker and run Python
    in the child, where without one it uses vfork; in a Celery pool child that is ~50 ms of
    wall time per start against ~3 ms (setpriv's own exec included) on a loaded 2-core machine.
    """
    if _libc is None:
        return ()
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


def popen_dying_with_parent(command: list[str]) -> subprocess.Popen[bytes]:
    """Start `command` in its own session (a cancel kills its group) with stdout and stderr
    piped and no stdin, killed by the kernel when the thread that started it dies (see
    _die_with_parent): through setpriv where it is installed, else through a preexec_fn."""
    prefix = _pdeathsig_prefix()
    return subprocess.Popen(
        [*prefix, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: a cancel kills it and its children
        preexec_fn=None if prefix else _die_with_parent,
    )


def stale_temporaries(output: Path, job_id: str) -> list[Path]:
    """Temporary outputs that earlier attempts of this job left beside `output`."""
    stem = glob.escape(_temporary_stem(output, job_id))  # a `[` in a name is no pattern
    return list(output.parent.glob(f".{stem}.{job_id}.*.part{glob.escape(output.suffix)}"))


class _LinePipes:
    """Lines from several pipes read in one thread: `read` waits up to `timeout_s` for data on
    any of them and hands each complete line (without its newline) to `on_line(name, line)`; a
    pipe at its end gives its last unterminated line and is dropped from `open`."""

    def __init__(self, names: dict[int, str]) -> None:
        self._selector = selectors.DefaultSelector()
        self._partial: dict[int, bytes] = {}
        for fd, name in names.items():
            self._selector.register(fd, selectors.EVENT_READ, name)
            self._partial[fd] = b""
        self.open = len(names)

    def read(self, timeout_s: float, on_line: Callable[[str, bytes], None]) -> None:
        for key, _ in self._selector.select(timeout_s):
            fd, name = int(key.fd), str(key.data)
            data = os.read(fd, 1 << 16)
            if not data:
                self._selector.unregister(fd)
                self.open -= 1
                rest, self._partial[fd] = self._partial[fd], b""
                if rest:
                    on_line(name, rest)
                continue
            *lines, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
            for line in lines:
                on_line(name, line)

    def close(self) -> None:
        self._selector.close()


def run_ffmpeg(
    command: list[str],
    on_progress: Callable[[ProgressSample], None],
    should_stop: Callable[[], bool],
    check_every_s: float = 0.25,
    input_file: Path | None = None,
) -> RunOutcome:
    """Run ffmpeg in its own process group, report each progress block, and kill the whole
    group when `should_stop()` turns true (checked about every `check_every_s` seconds).
    input_file: measure how much of it ffmpeg has read (ProgressSample.read_fraction)."""
    proc = popen_dying_with_parent(with_progress(command))
    assert proc.stdout is not None and proc.stderr is not None
    head: list[str] = []
    tail: deque[str] = deque(maxlen=LOG_KEEP_LINES)
    counted = 0
    meter = InputReadMeter(proc.pid, input_file) if input_file is not None else None
    block: dict[str, str] = {}
    last: ProgressSample | None = None

    def on_line(stream: str, raw: bytes) -> None:
        nonlocal counted, block, last
        if stream == "stderr":
            line = raw.decode(errors="replace").rstrip()
            if line:
                counted += 1
                if len(head) < LOG_KEEP_LINES:
                    head.append(line)
                else:
                    tail.append(line)
            return
        if stopped:  # after a stop only the log is read, no progress reported
            return
        key, _, value = raw.decode(errors="replace").strip().partition("=")
        block[key] = value
        if key == "progress":
            sample = parse_progress_block(block)
            block = {}
            if meter is not None:
                read = 1.0 if sample.done else meter.fraction()
                sample = dataclasses.replace(sample, read_fraction=read)
            last = sample
            on_progress(sample)

    # Both pipes are read in this thread (one selector, no reader threads: a thread started
    # costs more than a tiny job's whole progress).
    pipes = _LinePipes({proc.stdout.fileno(): "progress", proc.stderr.fileno(): "stderr"})
    stopped = False
    try:
        while pipes.open:
            pipes.read(check_every_s, on_line)
            if should_stop():
                stopped = True
                break
    finally:
        if stopped or proc.poll() is None:
            kill_group(proc)  # stopped on request, or our loop raised: never leave ffmpeg behind
    returncode = proc.wait()
    if stopped:  # what ffmpeg wrote before it was killed still goes into the log
        deadline = time.monotonic() + 5.0
        while pipes.open and time.monotonic() < deadline:
            pipes.read(0.25, on_line)
    pipes.close()
    proc.stdout.close()
    proc.stderr.close()
    log = list(head)
    left_out = counted - len(head) - len(tail)
    if left_out > 0:
        log.append(f"[... {left_out} lines left out ...]")
    log += tail
    return RunOutcome(
        returncode=None if stopped else returncode,
        stderr_tail=log[-STDERR_TAIL_LINES:],
        stopped=stopped,
        log=log,
        last=last,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ffmpeg's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def temporary_output(output: Path, job_id: str, attempt: int) -> Path:
    """A hidden name beside the output, same extension so ffmpeg picks the same muxer:
    `.<stem>.<job id>.<attempt>.part<suffix>`, the stem cut (whole characters) so the name
    fits where the output's own name fits (255 bytes: an output name of 80 CJK characters
    is 240)."""
    return output.with_name(f".{_temporary_stem(output, job_id)}.{job_id}.{attempt}.part"
                            f"{output.suffix}")  # fmt: skip


def _temporary_stem(output: Path, job_id: str) -> str:
    """The output's stem, cut to leave room for the rest of a temporary name (an attempt
    number of up to 3 digits)."""
    rest = len(f"..{job_id}.999.part{output.suffix}".encode())
    room = NAME_MAX - rest
    return output.stem.encode()[:room].decode(errors="ignore")


class Throttle:
    """Lets an update through at most every `interval_s` seconds; `force` always passes.
    wait_first: the first one passes only `interval_s` after the throttle was made (default:
    at once)."""

    def __init__(self, interval_s: float, wait_first: bool = False) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic() if wait_first else float("-inf")

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False
