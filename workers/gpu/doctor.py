"""`gpujobs doctor`: what a GPU node needs, checked one thing at a time, each with its fix.

The order follows the chain a transcode depends on: the driver (nvidia-smi), the libraries ffmpeg
opens at run time (libcuda; libnvidia-encode for NVENC and libnvcuvid for NVDEC, which WSL2 keeps
under /usr/lib/wsl/lib and does not inject into containers by itself), ffmpeg's encoders and
filters, a one-second test encode on each path, then the services around it (the broker, the
vLLM endpoint) and swap, which the kubelet refuses to run with.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gpujobs.config import Settings
from gpujobs.media import probe
from gpujobs.specs import TranscodeSpec
from workers.gpu.discovery import list_gpus
from workers.transcode.command import EncodePath, Route, build_command, ffmpeg_version
from workers.transcode.plan import plan_streams

CHECK_TIMEOUT_S = 60.0
# Where the driver's user-space libraries live: WSL2's own folder first, then the usual ones.
LIBRARY_DIRS = (
    "/usr/lib/wsl/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",  # where the NVIDIA container toolkit mounts them in some images
)
LIBRARIES = {
    "libcuda.so.1": "CUDA (every GPU path)",
    "libnvidia-encode.so.1": "NVENC (the nvenc path)",
    "libnvcuvid.so.1": "NVDEC (-hwaccel cuda decode)",
}
WSL_LIB_FIX = (
    "install the NVIDIA driver on the Windows host; in a pod mount the host's /usr/lib/wsl "
    "(hostPath) and set LD_LIBRARY_PATH=/usr/lib/wsl/lib, NVIDIA_DRIVER_CAPABILITIES="
    "compute,video,utility"
)
LINUX_LIB_FIX = (
    "install the NVIDIA driver (it ships libcuda, libnvidia-encode and libnvcuvid); in a "
    "container use the NVIDIA container toolkit with NVIDIA_DRIVER_CAPABILITIES="
    "compute,video,utility"
)
# What to do about the driver, by platform (see detect_platform).
DRIVER_FIX = {
    "wsl2": "install the NVIDIA driver on the Windows host (not inside WSL) and check "
    "`nvidia-smi` runs in WSL",
    "linux": "install the NVIDIA driver and check `nvidia-smi` runs; in Kubernetes, the NVIDIA "
    "device plugin gives the pod its GPU",
}
SWAP_FIX = {
    "wsl2": "set swap=0 under [wsl2] in %UserProfile%\\.wslconfig, then `wsl --shutdown` "
    "(the kubelet refuses to run with swap)",
    "linux": "swapoff -a and remove swap from /etc/fstab (the kubelet refuses to run with swap)",
}


@dataclass(frozen=True)
class Check:
    """One line of the report. detail: what was found; fix: what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False  # not applicable here (a GPU check on a machine without a GPU)

    @property
    def mark(self) -> str:
        """PASS, FAIL or SKIP."""
        return "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")


def detect_platform(
    proc_version: Path = Path("/proc/version"), environ: dict[str, str] | None = None
) -> str:
    """ "wsl2" under Windows' WSL2 (its kernel names Microsoft, or WSL_DISTRO_NAME is set), else
    "linux"; the fixes doctor gives depend on it."""
    env = os.environ if environ is None else environ
    if env.get("WSL_DISTRO_NAME") or env.get("WSL_INTEROP"):
        return "wsl2"
    try:
        version = proc_version.read_text().lower()
    except OSError:
        return "linux"
    return "wsl2" if "microsoft" in version or "wsl2" in version else "linux"


def _run(args: list[str], timeout_s: float = CHECK_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)


def check_nvidia_smi(platform: str = "linux") -> Check:
    """PASS with the GPUs found; with none, SKIP (a CPU node is a valid node), with the fix
    that would make this a GPU node on this platform."""
    gpus = list_gpus()
    if not gpus:
        return Check(
            "nvidia-smi", False, "no NVIDIA GPU (nvidia-smi missing, failing, or sees none): "
            "GPU checks skipped", DRIVER_FIX.get(platform, DRIVER_FIX["linux"]), skipped=True,
        )  # fmt: skip
    names = ", ".join(f"{gpu.index}: {gpu.name}" for gpu in gpus)
    return Check(
        "nvidia-smi", True, f"{len(gpus)} GPU(s), driver {gpus[0].driver_version}: {names}"
    )


def library_dirs() -> list[str]:
    """LD_LIBRARY_PATH's folders, then LIBRARY_DIRS, without repeats."""
    extra = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    return list(dict.fromkeys([*extra, *LIBRARY_DIRS]))


def find_library(name: str, dirs: list[str] | None = None) -> Path | None:
    """The first `name` in the library folders, else what the loader cache (ldconfig) knows."""
    for folder in dirs if dirs is not None else library_dirs():
        candidate = Path(folder) / name
        if candidate.exists():
            return candidate
    try:
        cache = _run(["ldconfig", "-p"], timeout_s=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in cache.splitlines():
        if line.strip().startswith(name + " ") and "=>" in line:
            return Path(line.split("=>")[-1].strip())
    return None


def check_libraries(platform: str = "linux", has_gpu: bool = True) -> Iterator[Check]:
    """Each driver library ffmpeg opens; without a GPU a missing one is SKIP, not FAIL."""
    fix = WSL_LIB_FIX if platform == "wsl2" else LINUX_LIB_FIX
    for name, purpose in LIBRARIES.items():
        found = find_library(name)
        if found is not None:
            yield Check(name, True, f"{found} ({purpose})")
        elif has_gpu:
            yield Check(name, False, f"not found ({purpose})", fix)
        else:
            yield Check(name, False, f"not found ({purpose}); skipped: no GPU", skipped=True)


def check_ffmpeg_features(ffmpeg: str) -> Iterator[Check]:
    try:
        encoders = _run([ffmpeg, "-hide_banner", "-encoders"]).stdout
        filters = _run([ffmpeg, "-hide_banner", "-filters"]).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        yield Check("ffmpeg", False, f"{ffmpeg} does not run: {exc}",
                    "set GPUJOBS_FFMPEG or install the worker extra (imageio-ffmpeg)")  # fmt: skip
        return
    yield Check("ffmpeg", True, f"{ffmpeg} (version {ffmpeg_version(ffmpeg)})")
    wanted = {
        "h264_nvenc": (encoders, "encoder"),
        "libx264": (encoders, "encoder"),
        "scale_cuda": (filters, "filter"),
        "hwupload_cuda": (filters, "filter"),
        # The GPU paths deinterlace and turn rotated video upright on the card.
        "bwdif_cuda": (filters, "filter"),
        "transpose_cuda": (filters, "filter"),
    }
    for name, (listing, kind) in wanted.items():
        present = any(name in line.split() for line in listing.splitlines())
        yield Check(
            f"ffmpeg {kind} {name}", present, "built in" if present else "missing from this build",
            "use a build with NVIDIA support (the BtbN build imageio-ffmpeg ships has it)",
        )  # fmt: skip


def check_paths(ffmpeg: str, seconds: float = 1.0, has_gpu: bool = True) -> Iterator[Check]:
    """A `seconds`-long test encode on each path, with how fast it went; without a GPU the GPU
    paths are SKIP, not tried."""
    spec = TranscodeSpec(input="in.mp4", output="out.mp4", audio="none")
    fixes = {
        EncodePath.NVENC: "needs an NVENC-capable card (not A100/H100/H200), libnvidia-encode and "
        "a free NVENC session",
        EncodePath.CUDA_DECODE: "needs libcuda and libnvcuvid (see above)",
        EncodePath.CPU: "needs ffmpeg with libx264",
    }
    with tempfile.TemporaryDirectory(prefix="gpujobs-doctor-") as folder:
        clip = Path(folder) / "in.mp4"
        try:
            made = _run([
                ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(clip),
            ])  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            yield Check("test clip", False, f"{ffmpeg} does not run: {exc}", fixes[EncodePath.CPU])
            return
        if made.returncode != 0:
            yield Check("test clip", False, made.stderr.strip()[-200:], fixes[EncodePath.CPU])
            return
        plan = plan_streams(spec, probe(clip))
        for path in EncodePath:
            if path is not EncodePath.CPU and not has_gpu:
                yield Check(f"encode {path.value}", False, "skipped: no GPU", skipped=True)
                continue
            out = Path(folder) / f"out-{path.value}.mp4"
            route = Route(path, gpu_decode=path is not EncodePath.CPU)
            command = build_command(ffmpeg, spec, plan, route, str(clip), str(out))
            command[1:1] = ["-hide_banner", "-nostdin", "-loglevel", "error"]
            began = time.monotonic()
            try:
                result = _run(command)
            except subprocess.TimeoutExpired:
                yield Check(f"encode {path.value}", False, "timed out", fixes[path])
                continue
            took = time.monotonic() - began
            if result.returncode == 0 and out.exists():
                speed = f"{seconds:g} s of 720p in {took:.2f} s ({seconds / took:.1f}x)"
                yield Check(f"encode {path.value}", True, speed)
            else:
                yield Check(f"encode {path.value}", False, first_error(result.stderr), fixes[path])


def first_error(stderr: str) -> str:
    """ffmpeg's first error line, which names the cause ("Cannot load libcuda.so.1"); the last
    one only says that opening the output failed. Log prefixes like `[CUDA @ 0x...]` go."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "ffmpeg failed without a message"
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", lines[0])[:200]


def check_broker(settings: Settings) -> Check:
    from gpujobs.connection import broker_url, connect, redact
    from gpujobs.errors import GpujobsError

    try:
        url = broker_url(settings, start_local=False)
        connect(url, settings).close()
    except GpujobsError as exc:
        fix = "set GPUJOBS_BROKER_URL (and GPUJOBS_REDIS_PASSWORD), or `gpujobs up`"
        return Check("broker", False, str(exc), fix)
    return Check("broker", True, redact(url))


def check_vllm(endpoint: str, timeout_s: float = 3.0) -> Check:
    url = endpoint.rstrip("/") + "/models"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Check("vLLM endpoint", False, f"{url}: {exc.__class__.__name__}: {exc}",
                     "start vLLM (port 9999) or set GPUJOBS_VLLM_ENDPOINT")  # fmt: skip
    if response.status_code != 200:
        return Check("vLLM endpoint", False, f"{url}: HTTP {response.status_code}",
                     "check the server's logs and API key")  # fmt: skip
    try:
        models = [m.get("id") for m in response.json().get("data", [])]
    except (ValueError, AttributeError, TypeError):  # not JSON, or not the OpenAI list shape
        models = []
    return Check("vLLM endpoint", True, f"{url}: {', '.join(map(str, models)) or 'no models'}")


def check_swap(swaps: Path = Path("/proc/swaps"), platform: str = "linux") -> Check:
    try:
        lines = swaps.read_text().splitlines()[1:]  # the first line is the header
    except OSError as exc:
        return Check("swap", False, f"cannot read {swaps}: {exc}", "")
    active = [line.split()[0] for line in lines if line.strip()]
    if active:
        return Check("swap", False, f"on ({', '.join(active)})",
                     SWAP_FIX.get(platform, SWAP_FIX["linux"]))  # fmt: skip
    return Check("swap", True, "off")


def run_checks(settings: Settings, platform: str | None = None) -> Iterator[Check]:
    """Every check, in order; each is independent, so one failure does not hide the rest.
    platform: "wsl2" or "linux" (default: detect_platform()), for the fixes."""
    platform = platform or detect_platform()
    smi = check_nvidia_smi(platform)
    has_gpu = not smi.skipped
    yield smi
    yield from check_libraries(platform, has_gpu)
    ffmpeg = settings.ffmpeg_binary()
    yield from check_ffmpeg_features(ffmpeg)
    yield from check_paths(ffmpeg, has_gpu=has_gpu)
    yield check_broker(settings)
    yield check_vllm(settings.vllm_endpoint)
    yield check_swap(platform=platform)


def verdict(checks: list[Check]) -> str:
    """One line: what this node can run, from the checks' outcomes."""
    by_name = {check.name: check for check in checks}
    paths = [p.value for p in EncodePath if by_name.get(f"encode {p.value}", SKIPPED).ok]
    gpu = by_name.get("nvidia-smi")
    named = f"the {', '.join(paths)} path{'s' if len(paths) > 1 else ''}"
    transcodes = f"transcodes on {named}" if paths else "no transcodes"
    if gpu is not None and gpu.skipped:
        transcodes += " (no GPU here)"
    vllm = by_name.get("vLLM endpoint")
    inference = "batch inference" if vllm is not None and vllm.ok else (
        "no batch inference (vLLM endpoint unreachable)")  # fmt: skip
    broker = by_name.get("broker")
    joined = "" if broker is None or broker.ok else "; not joined: the broker is unreachable"
    return f"verdict: this node can run {transcodes}; {inference}{joined}"


SKIPPED = Check("", False, "", skipped=True)
