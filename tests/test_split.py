"""Split transcodes on real workers, a real Valkey and the real ffmpeg: the joined output has the
source's frames, duration and audio, looks like a single-pass encode at every join, survives a
SIGKILLed worker, and cancels as a whole."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs.client import Client, Job
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.media import probe
from gpujobs.specs import JobRecord, JobState, TranscodeSpec
from tests.helpers import WorkerProcess, wait_for
from workers.transcode import split
from workers.transcode.plan import plan_streams

FAST_RECOVERY = {"GPUJOBS_LEASE_S": "4", "GPUJOBS_WATCHDOG_INTERVAL_S": "0.5"}


def gop_clip(ffmpeg: str, path: Path, seconds: float, size: str, gop: int = 60) -> Path:
    """testsrc2 at 30 fps with a keyframe every `gop` frames, and a sine tone (AAC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", str(gop), "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip
    return path


def psnr_per_frame(ffmpeg: str, a: Path, b: Path, log: Path) -> list[float]:
    """PSNR (dB, average of Y, U, V) of each frame of `a` against `b`."""
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(a), "-i", str(b),
         "-lavfi", f"[0:v][1:v]psnr=stats_file={log}", "-f", "null", "-"],
        check=True,
    )  # fmt: skip
    values = re.findall(r"psnr_avg:(\S+)", log.read_text())
    return [float("inf") if v == "inf" else float(v) for v in values]


def test_cuts_land_on_keyframes_near_even_split_points() -> None:
    keyframes = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert split.choose_cuts(keyframes, 12.0, 3) == [4.0, 8.0]
    assert split.choose_cuts(keyframes, 12.0, 2) == [6.0]
    assert split.choose_cuts([0.0, 8.3], 10.0, 4) == [8.3]  # fewer keyframes, fewer pieces
    assert split.choose_cuts([0.0], 10.0, 4) == []
    assert split.auto_pieces(600.0, idle=4, min_piece_s=30) == 4
    assert split.auto_pieces(70.0, idle=4, min_piece_s=30) == 2  # no piece under 30 s
    assert split.auto_pieces(20.0, idle=4, min_piece_s=30) == 1


def test_auto_counts_idle_workers_from_heartbeats(client: Client) -> None:
    from workers.heartbeat import make_heartbeat, publish

    beats = [
        make_heartbeat("n1", [], ["gpujobs@n1.gpu0", "gpujobs@n1.gpu1"], ["job-a"], 0),
        make_heartbeat("n2", [], ["gpujobs@n2.gpu0", "gpujobs@n2.gpu1"], [], 0),
    ]
    for beat in beats:
        publish(client.redis, beat, ttl_s=30)
    # 4 workers, 1 busy (the one planning the split counts as about to be free): 4 idle.
    assert split.idle_workers(client.redis) == 4


def test_split_commands_cut_video_only_and_join_with_the_sources_audio(
    ffmpeg: str, tmp_path: Path
) -> None:
    cut = split.cut_command("ffmpeg", Path("/m/in.mp4"), [4.0, 8.0], 1 / 30, Path("/w/cut%03d.mp4"))
    assert cut[cut.index("-map") + 1] == "0:v:0" and cut[cut.index("-c") + 1] == "copy"
    assert cut[cut.index("-segment_times") + 1] == "3.983333,7.983333"
    # The join maps the source's audio as a single pass would (the stream plan of the job).
    source = gop_clip(ffmpeg, tmp_path / "in.mp4", 1, "320x240")
    plan = plan_streams(TranscodeSpec(input="in.mp4", output="out.mp4"), probe(source))
    join = split.join_command("ffmpeg", Path("/w/list"), source, plan, Path("/m/out.mp4"))
    assert join[:8] == ["ffmpeg", "-f", "concat", "-safe", "0", "-i", "/w/list", "-i"]
    assert join[9:17] == ["-map", "0:v:0", "-map", "1:1", "-c:v", "copy", "-c:a:0", "copy"]


def test_a_bad_split_is_one_line_and_queues_nothing(client: Client, ffmpeg: str) -> None:
    source = gop_clip(ffmpeg, client.settings.media / "bad.mp4", 1, "320x240")
    with pytest.raises(InvalidSpec, match=r"^split: must be auto or 1..64 pieces, got 0$"):
        client.submit_transcode(source, split=0)
    assert client.list() == []


def watch_split(job: Job, timeout_s: float) -> list[JobRecord]:
    return list(job.watch(timeout=timeout_s))


@pytest.mark.timeout(300)
def test_split_output_matches_the_source_and_a_single_pass_encode(
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
    tmp_path: Path,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "talk.mp4", 12, "640x360")
    start_worker("--hostname", "a@test")
    start_worker("--hostname", "b@test")
    params = {"height": 360, "preset": "p5", "cq": 18}
    job = client.submit_transcode(source, settings.media / "talk.split.mp4", split=3, **params)
    single = client.submit_transcode(source, settings.media / "talk.single.mp4", **params)
    seen = watch_split(job, 240)
    final = seen[-1]
    assert final.state is JobState.SUCCEEDED, final.error
    assert single.wait(timeout=240).state is JobState.SUCCEEDED
    # The parent listed its pieces and showed combined progress while they ran.
    assert final.pieces == [f"{job.id}-p{i}" for i in range(3)]
    assert any(r.state is JobState.RUNNING and 0 < r.percent < 100 and r.pieces for r in seen)
    for piece_id in final.pieces:
        piece = client.store.get(piece_id)
        assert piece is not None and piece.state is JobState.SUCCEEDED and piece.parent == job.id
    wait_for(lambda: len(client.store.attempts(job.id)) == 2, 10)
    outcomes = [h["outcome"] for h in client.store.attempts(job.id)]
    assert outcomes == ["planned", "succeeded"]
    # Frames, duration (within a frame), audio length and continuity against the source.
    src = split.read_facts(source)
    out = split.read_facts(settings.media / "talk.split.mp4")
    assert out.frames == src.frames == 360
    assert abs(out.video_end_s - src.video_end_s) <= src.frame_s
    assert out.monotonic and out.audio_gaps == 0
    assert out.audio_end_s is not None and src.audio_end_s is not None
    assert abs(out.audio_end_s - src.audio_end_s) <= src.frame_s
    # Next to a single-pass encode of the same settings: above 40 dB on every frame near a join.
    psnr = psnr_per_frame(
        ffmpeg, settings.media / "talk.split.mp4", settings.media / "talk.single.mp4",
        tmp_path / "psnr.log",
    )  # fmt: skip
    assert len(psnr) == 360
    cuts = [round(k * 30) for k in split.choose_cuts(src.keyframes, src.video_end_s, 3)]
    assert cuts == [120, 240]
    for cut in cuts:
        near = psnr[cut - 3 : cut + 3]
        assert min(near) > 40, (cut, near)
    assert min(psnr) > 40
    assert not list(settings.media.glob(".*split*")), "the pieces' folder is removed"
    from tests.test_cli import gpujobs

    shown = gpujobs("status", job.id).stdout
    assert "pieces" in shown and f"{job.id}-p0, {job.id}-p1, {job.id}-p2" in shown, shown
    assert re.search(rf"piece of +{job.id}", gpujobs("status", f"{job.id}-p1").stdout)


@pytest.mark.timeout(300)
def test_a_piece_whose_worker_dies_reruns_alone_and_the_job_succeeds_once(
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "long.mp4", 20, "960x540")
    workers = {n: start_worker("--hostname", n, env=FAST_RECOVERY) for n in ("a@test", "b@test")}
    job = client.submit_transcode(source, split=2, height=540, preset="p6")
    victim_piece = None
    for record in job.watch(timeout=120):
        if record.pieces:
            for piece_id in record.pieces:
                piece = client.store.get(piece_id)
                if piece and piece.state is JobState.RUNNING and piece.percent > 0:
                    victim_piece = piece
            if victim_piece is not None:
                break
    assert victim_piece is not None and victim_piece.worker is not None
    workers[victim_piece.worker].kill()  # SIGKILL: no goodbye, no ack
    killed_at = time.monotonic()
    final = job.wait(timeout=240)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.pieces is not None
    for piece_id in final.pieces:
        outcomes = [h["outcome"] for h in client.store.attempts(piece_id)]
        if piece_id == victim_piece.id:
            assert outcomes == ["requeued", "succeeded"], outcomes
        else:
            assert outcomes == ["succeeded"], outcomes
    # The history entry follows the record's move to succeeded.
    wait_for(lambda: "succeeded" in [h["outcome"] for h in client.store.attempts(job.id)], 10)
    parent_outcomes = [h["outcome"] for h in client.store.attempts(job.id)]
    assert parent_outcomes == ["planned", "succeeded"], parent_outcomes
    assert time.monotonic() - killed_at < 240
    out = split.read_facts(settings.media / "long.540p.mp4")
    assert out.frames == 600 and out.monotonic


@pytest.mark.timeout(200)
def test_cancelling_a_split_job_cancels_every_piece(
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "stop.mp4", 20, "960x540")
    start_worker("--hostname", "a@test")
    job = client.submit_transcode(source, split=2, height=540, preset="p6")
    for record in job.watch(timeout=120):
        if record.pieces and record.percent > 0:
            break
    assert job.cancel()
    final = job.wait(timeout=30)
    assert final.state is JobState.CANCELLED and final.pieces is not None
    for piece_id in final.pieces:
        piece = client.job(piece_id).wait(timeout=60)
        assert piece.state is JobState.CANCELLED
    assert not (settings.media / "stop.540p.mp4").exists()
    wait_for(lambda: not list(settings.media.glob(".*split*")), 30)  # the pieces' folder goes


@pytest.mark.timeout(120)
def test_auto_on_a_short_clip_is_one_single_pass_encode(
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "short.mp4", 4, "320x240")
    start_worker()
    job = client.submit_transcode(source, split="auto", height=240)
    final = job.wait(timeout=90)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.pieces is None and "split" not in final.spec
    assert (final.result or {}).get("encode_path") == "cpu"
    wait_for(lambda: len(client.store.attempts(job.id)) == 2, 10)
    history = client.store.attempts(job.id)
    assert [h["outcome"] for h in history] == ["planned", "succeeded"]
    assert "one piece (1 asked)" in history[0]["reason"]
