"""GPU discovery, pinning and capabilities; `gpujobs doctor`; and, where nvidia-smi finds a real
GPU, every encode path the card has, run for real (marked `gpu`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs.media import probe
from gpujobs.specs import TranscodeSpec
from workers.gpu import doctor
from workers.gpu.discovery import (
    MEASURED_ENV,
    NO_GPU,
    Capabilities,
    GpuInfo,
    list_gpus,
    measure,
    parse_smi_csv,
    pinned_gpu,
)
from workers.supervisor import select_gpus
from workers.transcode.command import EncodePath, build_command, choose_path, route
from workers.transcode.plan import plan_streams

FAKE_BIN = Path(__file__).parent / "fake_bin"
SMI_OUTPUT = """\
0, GPU-1a2b, NVIDIA GeForce RTX 5090, 32607, 1200, 35, 581.57
1, GPU-3c4d, NVIDIA H200, 143771, [N/A], [N/A], 581.57
"""


def with_fake_smi(monkeypatch: pytest.MonkeyPatch, gpus: int = 4) -> None:
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GPUS", str(gpus))


def test_parse_nvidia_smi_csv_including_missing_numbers() -> None:
    rtx, h200 = parse_smi_csv(SMI_OUTPUT)
    assert rtx == GpuInfo(0, "GPU-1a2b", "NVIDIA GeForce RTX 5090", 32607, 1200, 35, "581.57")
    assert (h200.memory_used_mb, h200.utilization_pct) == (None, None)
    assert parse_smi_csv("No devices were found\n") == []


def test_discovery_through_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    with_fake_smi(monkeypatch, 4)
    gpus = list_gpus()
    assert [gpu.index for gpu in gpus] == [0, 1, 2, 3]
    assert gpus[2].uuid.endswith("2") and gpus[2].driver_version == "581.57"


def test_no_gpu_is_an_honest_empty_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert list_gpus() == []
    with_fake_smi(monkeypatch, 0)  # a driver that sees no device exits non-zero
    assert list_gpus() == []


def test_pinned_gpu_follows_cuda_visible_devices() -> None:
    gpus = parse_smi_csv(SMI_OUTPUT)
    assert pinned_gpu(gpus, "1") == gpus[1]
    assert pinned_gpu(gpus, "GPU-3c4d") == gpus[1]
    assert pinned_gpu(gpus, "") is None and pinned_gpu(gpus, "-1") is None
    assert pinned_gpu(gpus, "7") is None
    assert pinned_gpu([], None) is None


def test_the_stand_in_gpu_measures_as_unable(monkeypatch: pytest.MonkeyPatch, ffmpeg: str) -> None:
    """No driver here: every test job fails fast, and the worker will take the CPU path."""
    with_fake_smi(monkeypatch, 1)
    caps = measure(ffmpeg, list_gpus()[0])
    assert caps == Capabilities("NVIDIA GeForce RTX 5090", False, False, False)
    spec = TranscodeSpec(input="a.mp4", output="b.mp4")
    assert choose_path(spec, caps) is EncodePath.CPU


def test_capabilities_travel_from_supervisor_to_worker(tmp_path: Path) -> None:
    caps = Capabilities("NVIDIA H200", nvenc=False, cuda_decode=True, scale_cuda=True)
    code = (
        "from workers.gpu.discovery import detect_capabilities;"
        "print(detect_capabilities('/no/ffmpeg').to_json())"
    )
    env = {**os.environ, MEASURED_ENV: caps.to_json(), "PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert Capabilities.from_json(out) == caps
    assert Capabilities.from_json(NO_GPU.to_json()) == NO_GPU


def test_select_gpus() -> None:
    gpus = parse_smi_csv(SMI_OUTPUT)
    assert select_gpus("all", gpus) == gpus
    assert select_gpus(" 1 ", gpus) == [gpus[1]]
    assert select_gpus("NONE", gpus) is None


def test_doctor_reports_each_check_with_a_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: object
) -> None:
    monkeypatch.setenv("GPUJOBS_VLLM_ENDPOINT", "http://127.0.0.1:9/v1")  # nothing listens
    result = subprocess.run(
        [sys.executable, "-m", "gpujobs", "doctor"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
             "COLUMNS": "300"},
        check=False,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    by_name = {line.split(":")[0].split(" ", 1)[1]: line for line in lines[:-1]}
    assert by_name["broker"].startswith("PASS")
    assert by_name["encode cpu"].startswith("PASS")
    assert by_name["ffmpeg encoder libx264"].startswith("PASS")
    assert by_name["vLLM endpoint"].startswith("FAIL") and "fix:" in by_name["vLLM endpoint"]
    assert {"nvidia-smi", "libcuda.so.1", "libnvidia-encode.so.1", "libnvcuvid.so.1",
            "encode nvenc", "encode cuda-decode", "swap"} <= set(by_name)  # fmt: skip
    if not list_gpus():  # a CPU node: the GPU checks are skipped, not failed
        for name in ("nvidia-smi", "libcuda.so.1", "encode nvenc", "encode cuda-decode"):
            assert by_name[name].startswith("SKIP"), by_name[name]
        assert lines[-1] == ("verdict: this node can run transcodes on the cpu path (no GPU "
                             "here); no batch inference (vLLM endpoint unreachable)")  # fmt: skip
        assert result.returncode == 1  # the vLLM endpoint failed


def test_doctor_without_a_runnable_ffmpeg_reports_it_and_goes_on(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-ffmpeg")
    [check] = doctor.check_paths(missing)
    assert check.name == "test clip" and not check.ok and "does not run" in check.detail


def test_a_garbled_capabilities_hand_over_is_measured_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from workers.gpu.discovery import detect_capabilities

    monkeypatch.setenv(MEASURED_ENV, "[1, 2]")  # JSON, but not an object
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: measuring again gives NO_GPU
    detect_capabilities.cache_clear()
    try:
        assert detect_capabilities(str(tmp_path / "no-ffmpeg")) == NO_GPU
    finally:
        detect_capabilities.cache_clear()


def test_swap_and_library_checks(tmp_path: Path) -> None:
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")
    assert doctor.check_swap(swaps).ok
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n/swap.img file 8388604 0 -2\n")
    check = doctor.check_swap(swaps)
    assert not check.ok and "/swap.img" in check.detail and "swapoff" in check.fix
    (tmp_path / "libnvcuvid.so.1").touch()
    assert doctor.find_library("libnvcuvid.so.1", [str(tmp_path)]) == tmp_path / "libnvcuvid.so.1"


def _real_gpu() -> GpuInfo | None:
    if shutil.which("nvidia-smi") is None:
        return None
    gpus = list_gpus()
    return gpus[0] if gpus else None


@pytest.mark.gpu
@pytest.mark.skipif(_real_gpu() is None, reason="nvidia-smi finds no GPU")
def test_every_path_the_card_has_encodes_for_real(
    ffmpeg: str, clip_cache: Callable[..., Path], tmp_path: Path
) -> None:
    gpu = _real_gpu()
    assert gpu is not None
    caps = measure(ffmpeg, gpu)
    assert caps.cuda_decode and caps.scale_cuda, f"{gpu.name}: NVDEC/scale_cuda do not work"
    source = clip_cache(seconds=2, size="1280x720")
    spec = TranscodeSpec(input="in.mp4", output="out.mp4")
    paths = [EncodePath.CUDA_DECODE, EncodePath.CPU] + ([EncodePath.NVENC] if caps.nvenc else [])
    assert choose_path(spec, caps) is (EncodePath.NVENC if caps.nvenc else EncodePath.CUDA_DECODE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    plan = plan_streams(spec, probe(source))
    for path in paths:
        out = tmp_path / f"{path.value}.mp4"
        command = build_command(ffmpeg, spec, plan, route(path, plan.video), str(source), str(out))
        run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        assert run.returncode == 0, f"{path.value}: {run.stderr[-500:]}"
        info = probe(out)
        assert (info.video_codec, info.width, info.height) == ("h264", 854, 480)


def test_doctor_gives_wsl2_advice_only_on_wsl2(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("Linux version 6.6.87.2-microsoft-standard-WSL2 (root@host)")
    assert doctor.detect_platform(version, environ={}) == "wsl2"
    version.write_text("Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)")
    assert doctor.detect_platform(version, environ={}) == "linux"
    assert doctor.detect_platform(version, environ={"WSL_DISTRO_NAME": "Ubuntu"}) == "wsl2"
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename Type Size Used Priority\n/swap.img file 1024 0 -2\n")
    assert ".wslconfig" in doctor.check_swap(swaps, platform="wsl2").fix
    assert ".wslconfig" not in doctor.check_swap(swaps, platform="linux").fix
    for platform, wsl in (("linux", False), ("wsl2", True)):
        checks = list(doctor.check_libraries(platform, has_gpu=True))
        missing = [c for c in checks if not c.ok]
        assert all(("/usr/lib/wsl" in c.fix) is wsl for c in missing), (platform, missing)
    # Without a GPU, missing libraries are skipped and carry no fix.
    for check in doctor.check_libraries("linux", has_gpu=False):
        assert check.ok or (check.skipped and check.mark == "SKIP" and not check.fix)


def test_the_verdict_names_what_the_node_can_run() -> None:
    Check = doctor.Check
    gpu_node = [Check("nvidia-smi", True, "1 GPU(s)"), Check("encode nvenc", True, ""),
                Check("encode cuda-decode", True, ""), Check("encode cpu", True, ""),
                Check("broker", True, ""), Check("vLLM endpoint", True, "")]  # fmt: skip
    assert doctor.verdict(gpu_node) == (
        "verdict: this node can run transcodes on the nvenc, cuda-decode, cpu paths; "
        "batch inference"
    )
    lost = [
        Check("nvidia-smi", False, "", skipped=True), Check("encode cpu", False, "x"),
        Check("broker", False, "refused"), Check("vLLM endpoint", False, "refused"),
    ]  # fmt: skip
    assert doctor.verdict(lost) == (
        "verdict: this node can run no transcodes (no GPU here); no batch inference (vLLM "
        "endpoint unreachable); not joined: the broker is unreachable"
    )
