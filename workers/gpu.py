"""GPU discovery and what each card can do, measured with one-frame test runs, not guessed.

A card without NVENC (A100, H100, H200) still decodes with NVDEC and scales with scale_cuda; with
no GPU at all every path is the CPU's. The answers are cached for the life of the worker process.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

TEST_TIMEOUT_S = 30.0


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


NO_GPU = Capabilities(gpu_name=None, nvenc=False, cuda_decode=False, scale_cuda=False)


def gpu_names() -> list[str]:
    """Names of the GPUs nvidia-smi sees (honouring CUDA_VISIBLE_DEVICES is the driver's job)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        result = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=TEST_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _ffmpeg_ok(ffmpeg: str, args: list[str]) -> bool:
    try:
        result = subprocess.run(
            [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *args],
            capture_output=True,
            timeout=TEST_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


_TEST_SOURCE = ["-f", "lavfi", "-i", "testsrc2=size=256x144:rate=25:duration=0.2"]


@functools.cache
def detect_capabilities(ffmpeg: str) -> Capabilities:
    """Measure this worker's GPU once: a test NVENC encode, a CUDA decode and a scale_cuda run."""
    names = gpu_names()
    if not names:
        return NO_GPU
    nvenc = _ffmpeg_ok(
        ffmpeg, [*_TEST_SOURCE, "-frames:v", "1", "-c:v", "h264_nvenc", "-f", "null", "-"]
    )
    cuda = _ffmpeg_ok(
        ffmpeg,
        [
            "-hwaccel",
            "cuda",
            "-hwaccel_output_format",
            "cuda",
            *_TEST_SOURCE,
            "-vf",
            "hwupload_cuda,scale_cuda=128:72",
            "-f",
            "null",
            "-",
        ],
    )
    return Capabilities(gpu_name=names[0], nvenc=nvenc, cuda_decode=cuda, scale_cuda=cuda)
