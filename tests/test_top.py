"""`gpujobs top`: the view rendered to a string, and the real command following a real job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs import keys
from gpujobs.client import Client
from gpujobs.monitor.metrics import ClusterSnapshot, JobCounts, parse_heartbeat
from gpujobs.monitor.top import BAR_WIDTH, TopView, render_text
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import WorkerProcess
from tests.test_metrics import NODE, heartbeat


def record(job_id: str, state: JobState, percent: float = 0.0, **extra: object) -> JobRecord:
    return JobRecord.model_validate({
        "id": job_id, "kind": JobKind.TRANSCODE, "state": state, "percent": percent,
        "spec": {"input": f"in/{job_id}.mp4"}, "created_at": time.time() - 30, **extra,
    })  # fmt: skip


def test_the_view_renders_nodes_gpus_and_jobs_with_bars() -> None:
    now = time.time()
    node = parse_heartbeat(NODE, heartbeat(), now)
    assert node is not None
    view = TopView(
        snapshot=ClusterSnapshot(at=now, queues={"transcode": 4, "inference": 0},
                                 jobs=JobCounts(), nodes=[node], nvenc_in_use={NODE: 2}),
    )  # fmt: skip
    view.apply(record("aaaaaaaaaaaa", JobState.RUNNING, 42.0, fps=118.0, speed=3.9, eta_s=12,
                      node=NODE, gpu="0"))  # fmt: skip
    view.apply(record("bbbbbbbbbbbb", JobState.QUEUED))
    view.apply(record("cccccccccccc", JobState.RUNNING, 10.0))
    view.apply(record("cccccccccccc", JobState.FAILED, 10.0, error="ffmpeg exited with 1"))
    text = render_text(view)
    assert "running 1  queued 1" in text and "transcode 4" in text
    gpu_row = next(line for line in text.splitlines() if "RTX 5090" in line and " 0 " in line)
    assert NODE in gpu_row and "37%" in gpu_row and "2.0/31.8" in gpu_row
    running = next(line for line in text.splitlines() if "aaaaaaaaaaaa" in line)
    assert "running" in running and "42.0%" in running and "━" in running
    assert "118" in running and "3.90x" in running and f"{NODE}/0" in running
    failed = next(line for line in text.splitlines() if "cccccccccccc" in line)
    assert "failed" in failed and "ffmpeg exited with 1" in failed
    # Running jobs come first, then queued, then the finished ones.
    assert text.index("aaaaaaaaaaaa") < text.index("bbbbbbbbbbbb") < text.index("cccccccccccc")


def test_names_paths_and_errors_are_text_not_markup() -> None:
    now = time.time()
    node = parse_heartbeat("n[/x]", heartbeat("n[/x]"), now)
    assert node is not None
    view = TopView(snapshot=ClusterSnapshot(at=now, queues={}, jobs=JobCounts(), nodes=[node],
                                            nvenc_in_use={}))  # fmt: skip
    view.apply(record("dddddddddddd", JobState.FAILED, error="[h264_nvenc @ 0x5] [/x] no device"))
    view.apply(record("eeeeeeeeeeee", JobState.QUEUED, spec={"input": "in/[red]a[/].mp4"}))
    text = render_text(view)  # markup would raise MarkupError on `[/x]` or swallow `[h264...]`
    assert "n[/x]" in text and "[h264_nvenc @ 0x5] [/x] no device" in text
    assert "in/[red]a[/].mp4" in text


@pytest.mark.timeout(300)
def test_top_follows_a_running_job_live(
    client: Client,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client.redis.set(keys.heartbeat(NODE), heartbeat(), ex=30)
    client.redis.sadd(keys.NODES, NODE)
    start_worker()
    job = client.submit_transcode(media_clip("long.mp4", seconds=30, size="1920x1080"),
                                  preset="p7", height=1080)  # fmt: skip
    # A bar shows a whole `━` from 100/BAR_WIDTH % on: wait for that, however slow the machine.
    for current in job.watch(timeout=120):
        if current.state is JobState.RUNNING and current.percent >= 100 / BAR_WIDTH:
            break
    assert current.state is JobState.RUNNING, current
    # Piped, top prints each view in turn (the first one, then one per job event or node
    # refresh), frames split by a rule. Read them as they come, until five are drawn and the
    # job's percent has risen between the first and the last: on a busy machine that may take
    # many frames, so the bound is top's own --timeout, not a frame count.
    top = subprocess.Popen(
        [sys.executable, "-m", "gpujobs", "top", "--frames", "1000", "--timeout", "150"],
        env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert top.stdout is not None
    frames: list[str] = []
    percents: list[float] = []
    lines: list[str] = []
    try:
        for line in top.stdout:
            if not re.fullmatch(r"─{20,}\n?", line):
                lines.append(line)
                continue
            frame, lines = "".join(lines), []
            if "gpujobs top" not in frame:
                continue
            frames.append(frame)
            row = next(row for row in frame.splitlines() if job.id in row)
            assert "running" in row and "━" in row, frame
            percents.append(float(re.search(r"(\d+\.\d)%", row).group(1)))  # type: ignore[union-attr]
            if len(frames) >= 5 and percents[-1] > percents[0]:
                break
    finally:
        top.terminate()
        _, stderr = top.communicate(timeout=30)
        job.cancel()
    assert len(frames) >= 5 and percents[-1] > percents[0], (percents, stderr)
    assert percents == sorted(percents), percents
    assert NODE in frames[0] and "RTX 5090" in frames[0]
