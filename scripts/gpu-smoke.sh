#!/usr/bin/env bash
# GPU smoke test: on a machine with an NVIDIA GPU, run every encode path on a generated clip with
# the exact commands the workers run, and print which worked and how fast.
#
#   scripts/gpu-smoke.sh                 # GPU 0, a 10 s 1080p clip
#   GPU=2 SECONDS_LONG=30 scripts/gpu-smoke.sh
#   scripts/gpu-smoke.sh --require-gpu   # exit 1 (not 0) when this machine has no GPU
#   FIELD=DIR scripts/gpu-smoke.sh       # also every file of DIR (../shared/field/make-inputs.sh
#                                        # output) through the cuda-decode and nvenc paths
#
# Exit codes: 0 every path the card should have worked (or no GPU, without --require-gpu);
# 1 a path the card should have failed (NVDEC/scale_cuda on any NVIDIA card; NVENC on a card that
# is not in the no-NVENC list: A100, H100, H200, B200, A30) or no GPU with --require-gpu.
# Uses .venv/ when there is one (scripts/test.sh makes it), else python3 with gpujobs installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
REQUIRE_GPU=0
[[ "${1:-}" == "--require-gpu" ]] && REQUIRE_GPU=1
export GPU="${GPU:-0}" SECONDS_LONG="${SECONDS_LONG:-10}" REQUIRE_GPU
# Settings() needs a broker URL only to exist; nothing here connects to it.
export GPUJOBS_BROKER_URL="${GPUJOBS_BROKER_URL:-redis://unused:6379/0}"

exec "$PYTHON" - <<'PY'
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpujobs.config import Settings
from gpujobs.specs import TranscodeSpec
from workers.gpu.doctor import first_error
from workers.gpu.discovery import list_gpus, measure
from gpujobs.media import ProbeError, probe
from workers.transcode.command import EncodePath, build_command, route
from workers.transcode.plan import plan_streams
from workers.transcode.validate import failure_reason, validate_output

NO_NVENC = ("A100", "H100", "H200", "H800", "B200", "A30")  # datacenter cards without NVENC
index = int(os.environ["GPU"])
seconds = float(os.environ["SECONDS_LONG"])
gpus = {gpu.index: gpu for gpu in list_gpus()}
if not gpus:
    print("gpu-smoke: no NVIDIA GPU on this machine (nvidia-smi is missing or finds none); "
          "nothing to test. Run it on a GPU node (or: gpujobs doctor).")
    sys.exit(1 if os.environ["REQUIRE_GPU"] == "1" else 0)
if index not in gpus:
    print(f"gpu-smoke: no GPU {index} here (GPUs: {', '.join(map(str, sorted(gpus)))})")
    sys.exit(1)
gpu = gpus[index]
ffmpeg = Settings().ffmpeg_binary()
caps = measure(ffmpeg, gpu)
print(f"GPU {gpu.index}: {gpu.name}, {gpu.memory_total_mb} MiB, driver {gpu.driver_version}")
print(f"measured: nvenc={caps.nvenc} cuda_decode={caps.cuda_decode} scale_cuda={caps.scale_cuda}")
print(f"ffmpeg: {ffmpeg}")
env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
nvenc_expected = not any(name in gpu.name for name in NO_NVENC)
failed = False
with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as folder:
    clip = Path(folder) / "in-1080p.mp4"
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
         "-shortest", str(clip)],
        check=True,
    )
    spec = TranscodeSpec(input="in.mp4", output="out.mp4")  # the seed: 480p, p1, cq 28, copy
    plan = plan_streams(spec, probe(clip))
    print(f"clip: {seconds:g} s of 1080p30 H.264 + AAC -> 854x480\n")
    print(f"{'path':<12} {'result':<8} {'seconds':>8} {'x real time':>12} {'fps':>8}")
    for path in (EncodePath.NVENC, EncodePath.CUDA_DECODE, EncodePath.CPU):
        out = Path(folder) / f"out-{path.value}.mp4"
        command = build_command(ffmpeg, spec, plan, route(path, plan.video), str(clip), str(out))
        began = time.monotonic()
        run = subprocess.run(command[:1] + ["-hide_banner", "-nostdin", "-loglevel", "error"]
                             + command[1:], capture_output=True, text=True, env=env, check=False)
        took = time.monotonic() - began
        expected = path is not EncodePath.NVENC or nvenc_expected
        if run.returncode == 0:
            info = probe(out)
            ok = (info.width, info.height, info.video_codec) == (854, 480, "h264")
            result = "ok" if ok else "BAD"
            failed |= not ok
            print(f"{path.value:<12} {result:<8} {took:8.2f} {seconds / took:12.1f} "
                  f"{seconds * 30 / took:8.0f}")
        else:
            result = "FAILED" if expected else "absent"
            failed |= expected
            note = "" if expected else f" (expected: {gpu.name} has no NVENC)"
            print(f"{path.value:<12} {result:<8} {'-':>8} {'-':>12} {'-':>8}  "
                  f"{first_error(run.stderr)}{note}")
    field = Path(os.environ.get("FIELD", "")) if os.environ.get("FIELD") else None
    paths = [EncodePath.CUDA_DECODE] + ([EncodePath.NVENC] if nvenc_expected else [])
    if field is not None:
        print(f"\nfield inputs from {field}:")
        print(f"{'file':<28} {'path':<12} {'result':<8} {'size':>9} {'decode':<6} note")
    for source in sorted(field.iterdir()) if field is not None else []:
        name = source.name[:28]
        audio = "none" if source.name.startswith("audio-longer") else "copy"
        fspec = TranscodeSpec(input="in" + source.suffix, output="out.mp4", audio=audio)
        try:
            info = probe(source)
            fplan = plan_streams(fspec, info)
        except (ProbeError, ValueError) as exc:
            print(f"{name:<28} {'-':<12} {'refused':<8} {'-':>9} {'-':<6} {exc}")
            continue
        for path in paths:
            out = Path(folder) / f"field-{path.value}.mp4"
            fr = route(path, fplan.video)
            command = build_command(ffmpeg, fspec, fplan, fr, str(source), str(out))
            run = subprocess.run(command[:1] + ["-hide_banner", "-nostdin", "-loglevel",
                                 "level+error"] + command[1:], capture_output=True, text=True,
                                 env=env, check=False)
            if run.returncode != 0:
                failed = True
                reason = failure_reason(run.stderr.splitlines(), run.returncode)
                print(f"{name:<28} {fr.path.value:<12} {'FAILED':<8} {'-':>9} {'-':<6} {reason}")
                continue
            got = probe(out)
            problem = validate_output(got, info, fspec, fplan)
            failed |= problem is not None
            size = f"{got.width}x{got.height}"
            decode = "gpu" if fr.gpu_decode else "cpu"
            note = problem or fr.fallback or ""
            print(f"{name:<28} {fr.path.value:<12} {'BAD' if problem else 'ok':<8} {size:>9} "
                  f"{decode:<6} {note}")
print()
print("gpu-smoke: FAILED" if failed else "gpu-smoke: every path this card has works")
sys.exit(1 if failed else 0)
PY
