"""GPU discovery and what each card can do, measured with one-frame test runs, not guessed.

Discovery asks `nvidia-smi --query-gpu` (NVML through `nvidia-ml-py` when nvidia-smi is missing and
the package is installed); no GPU gives an honest empty list. A card without NVENC (A100, H100,
H200) still decodes with NVDEC and scales with scale_cuda; with no GPU every path is the CPU's.

Capabilities are measured once per worker start: the supervisor measures each GPU and hands the
answer to the pinned worker it starts (GPUJOBS_MEASURED_CAPABILITIES), so four workers do not run
the same test encodes four times.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TEST_TIMEOUT_S = 30.0
SMI_TIMEOUT_S = 10.0
# Set by the supervisor for the worker it pins to one GPU: that GPU's measured capabilities (JSON).
MEASURED_ENV = "GPUJOBS_MEASURED_CAPABILITIES"
# nvidia-smi's field names, in the order `GpuInfo` reads them.
SMI_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "driver_version",
)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the driver reports it. memory_*_mb: MiB; utilization_pct: 0..100 (None when the
    driver does not say, e.g. "[N/A]" on some WSL2 drivers)."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int | None
    memory_used_mb: int | None
    utilization_pct: int | None
    driver_version: str


@dataclass(frozen=True)
class Capabilities:
    """What this worker's GPU (the one CUDA_VISIBLE_DEVICES names) can do.

    gpu_name: None without a GPU; nvenc: a one-frame h264_nvenc encode works;
    cuda_decode: `-hwaccel cuda` decodes H.264; scale_cuda: the filter runs on the card.
    """

    gpu_name: str | None
    nvenc: bool
    cuda_decode: bool
    scale_cuda: bool

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    def flags(self) -> dict[str, bool]:
        """The three measured answers, as the heartbeat carries them."""
        return {"nvenc": self.nvenc, "cuda_decode": self.cuda_decode, "scale_cuda": self.scale_cuda}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Capabilities:
        data = json.loads(text)
        return cls(
            gpu_name=data.get("gpu_name"),
            nvenc=bool(data.get("nvenc")),
            cuda_decode=bool(data.get("cuda_decode")),
            scale_cuda=bool(data.get("scale_cuda")),
        )


NO_GPU = Capabilities(gpu_name=None, nvenc=False, cuda_decode=False, scale_cuda=False)


def _number(text: str) -> int | None:
    """An nvidia-smi number ("81559", "[N/A]", "N/A") as an int, or None."""
    try:
        return round(float(text.strip()))
    except ValueError:
        return None


def parse_smi_csv(text: str) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader,nounits` output."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(SMI_FIELDS):
            continue
        index = _number(fields[0])
        if index is None:
            continue
        gpus.append(
            GpuInfo(
                index=index,
                uuid=fields[1],
                name=fields[2],
                memory_total_mb=_number(fields[3]),
                memory_used_mb=_number(fields[4]),
                utilization_pct=_number(fields[5]),
                driver_version=fields[6],
            )
        )
    return sorted(gpus, key=lambda gpu: gpu.index)


def _gpus_from_smi(smi: str) -> list[GpuInfo] | None:
    """None when nvidia-smi could not answer (not an empty list: that means "no GPU")."""
    try:
        result = subprocess.run(
            [smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # "No devices were found" exits non-zero: a driver without GPUs is no GPU.
        return None
    return parse_smi_csv(result.stdout)


def _gpus_from_nvml() -> list[GpuInfo] | None:
    """The same facts through NVML (nvidia-ml-py), for images that ship the library only."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound and friends: no driver here
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:  # not supported on some WSL2 drivers
                util = None
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mb=int(memory.total) // (1024 * 1024),
                    memory_used_mb=int(memory.used) // (1024 * 1024),
                    utilization_pct=util,
                    driver_version=driver,
                )
            )
        return gpus
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):  # best effort: the library may be half set up
            pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_gpus() -> list[GpuInfo]:
    """Every GPU on this machine, by nvidia-smi index; [] when there is none or no driver.

    nvidia-smi ignores CUDA_VISIBLE_DEVICES and always lists the whole machine: a pinned worker
    finds its own GPU with `pinned_gpu()`.
    """
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        found = _gpus_from_smi(smi)
        if found is not None:
            return found
    return _gpus_from_nvml() or []


def pinned_gpu(gpus: list[GpuInfo], visible: str | None = None) -> GpuInfo | None:
    """The GPU a process pinned with CUDA_VISIBLE_DEVICES uses (its first visible device).

    visible: the variable's value (default: this process's). Unset: GPU 0 when there is one;
    empty or "-1" (hidden): None. An index or a UUID (GPU-...) selects that GPU.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus[0] if gpus else None
    first = visible.split(",")[0].strip()
    if not first or first == "-1":
        return None
    for gpu in gpus:
        if first.isdigit() and gpu.index == int(first):
            return gpu
        if not first.isdigit() and gpu.uuid.startswith(first):
            return gpu
    return None


def _ffmpeg_ok(ffmpeg: str, args: list[str], env: dict[str, str] | None = None) -> bool:
    try:
        result = subprocess.run(
            [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *args],
            capture_output=True,
            timeout=TEST_TIMEOUT_S,
            check=False,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


_TEST_SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=256x144:rate=25:duration=0.2"]


def _test_clip(ffmpeg: str, folder: Path) -> Path | None:
    """A tiny H.264 clip made on the CPU (libx264), for the CUDA decode test."""
    clip = folder / "probe-h264.mp4"
    ok = _ffmpeg_ok(
        ffmpeg,
        [*_TEST_SOURCE, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-y", str(clip)],
    )  # fmt: skip
    return clip if ok else None


def measure(ffmpeg: str, gpu: GpuInfo) -> Capabilities:
    """Run the three test jobs on `gpu` (pinned through CUDA_VISIBLE_DEVICES): a one-frame NVENC
    encode, a CUDA decode of an H.264 clip and a scale_cuda run. Seconds each on a real card,
    milliseconds where the driver is missing."""
    # PCI_BUS_ID makes CUDA number GPUs the way nvidia-smi does (its default is fastest first).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    nvenc = _ffmpeg_ok(
        ffmpeg,
        [*_TEST_SOURCE, "-frames:v", "1", "-c:v", "h264_nvenc", "-f", "null", "-"],
        env,
    )
    scale_cuda = _ffmpeg_ok(
        ffmpeg,
        [*_TEST_SOURCE, "-frames:v", "1",
         "-vf", "format=yuv420p,hwupload_cuda,scale_cuda=128:72,hwdownload,format=yuv420p",
         "-f", "null", "-"],
        env,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpujobs-caps-") as folder:
        clip = _test_clip(ffmpeg, Path(folder))
        # ffmpeg falls back to software decoding when -hwaccel fails; keeping the frames on the
        # card and downloading them explicitly makes such a fallback fail the test instead.
        cuda_decode = clip is not None and _ffmpeg_ok(
            ffmpeg,
            ["-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-i", str(clip),
             "-vf", "hwdownload,format=nv12", "-f", "null", "-"],
            env,
        )  # fmt: skip
    return Capabilities(
        gpu_name=gpu.name, nvenc=nvenc, cuda_decode=cuda_decode, scale_cuda=scale_cuda
    )


@functools.cache
def detect_capabilities(ffmpeg: str) -> Capabilities:
    """This worker's GPU, measured once: the supervisor's measurement when it passed one,
    else a test NVENC encode, CUDA decode and scale_cuda run on the pinned GPU."""
    handed = os.environ.get(MEASURED_ENV)
    if handed:
        try:
            return Capabilities.from_json(handed)
        except (ValueError, TypeError, AttributeError):  # AttributeError: JSON but no object
            pass  # a garbled hand-over: measure ourselves
    gpu = pinned_gpu(list_gpus())
    if gpu is None:
        return NO_GPU
    return measure(ffmpeg, gpu)
