"""ABR ladders: the GPU command and the NVENC sessions it holds (pinned), and HLS and DASH
ladders made by a real worker with the real ffmpeg, read back with PyAV: every variant has the
source's frames and keyframes at the same times as every other."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.ladder import LadderSpec, submit_ladder
from gpujobs.media import StreamInfo
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess
from workers.gpu.nvenc import NoNvencSlot, NvencSemaphore
from workers.transcode import ladder
from workers.transcode.split import read_facts


def gop_clip(ffmpeg: str, path: Path, seconds: float, size: str) -> Path:
    """testsrc2 at 30 fps (keyframe every 2 s), a sine tone as AAC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "60", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip
    return path


def spec(**values: object) -> LadderSpec:
    return LadderSpec.model_validate({"input": "in/talk.mp4", "output": "in/talk.hls", **values})


def shown(width: int, height: int) -> StreamInfo:
    """A progressive, upright video of this size with square pixels, as the probe reads it."""
    return StreamInfo(index=0, kind="video", kind_index=0, codec="h264", width=width,
                      height=height)  # fmt: skip


def test_the_gpu_ladder_is_one_decode_split_and_a_scaler_and_nvenc_per_rendition() -> None:
    video = shown(1920, 1080)
    renditions = ladder.plan_renditions([1080, 720, 480], video)
    command = ladder.build_command(
        "ffmpeg", spec(segment_s=4, cq=23), ladder.EncodePath.NVENC, "/m/in/talk.mp4",
        Path("/m/in/.talk.hls.part"), renditions, 30.0, has_audio=True, video=video,
    )  # fmt: skip
    assert command[:11] == [
        "ffmpeg", "-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-noautorotate",
        "-threads", "2", "-i", "/m/in/talk.mp4", "-filter_complex",
    ]  # fmt: skip
    assert command.count("-hwaccel") == 1 and command.count("-i") == 1  # one decode
    assert command[11] == (
        "[0:v]split=3[s0][s1][s2];"
        "[s0]scale_cuda=1920:1080[v0];"
        "[s1]scale_cuda=1280:720[v1];"
        "[s2]scale_cuda=854:480[v2]"
    )
    encoders = [(a, b) for a, b in itertools.pairwise(command) if a.startswith("-c:v")]
    assert encoders == [
        ("-c:v:0", "h264_nvenc"),
        ("-c:v:1", "h264_nvenc"),
        ("-c:v:2", "h264_nvenc"),
    ]
    joined = " ".join(command)
    assert "-g 120 -forced-idr 1" in joined  # a GOP of exactly one 4 s segment at 30 fps
    assert "-force_key_frames expr:gte(t,n_forced*4)" in joined
    assert "-maxrate:v:0 5000k -bufsize:v:0 10000k" in joined  # the capped bitrate table
    assert "-maxrate:v:2 1400k -bufsize:v:2 2800k" in joined
    assert "-hls_segment_type fmp4" in joined and "-master_pl_name master.m3u8" in joined
    assert "-var_stream_map v:0,a:0,name:1080p v:1,a:1,name:720p v:2,a:2,name:480p" in joined
    assert ladder.nvenc_sessions(ladder.EncodePath.NVENC, renditions) == 3
    assert ladder.nvenc_sessions(ladder.EncodePath.CPU, renditions) == 0


def test_renditions_above_the_source_are_skipped() -> None:
    rungs = ladder.plan_renditions([1080, 720, 480, 360], shown(1280, 720))
    assert [(r.width, r.height) for r in rungs] == [(1280, 720), (854, 480), (640, 360)]
    assert ladder.nvenc_sessions(ladder.EncodePath.NVENC, rungs) == 3


def test_a_ladder_takes_one_nvenc_slot_per_rendition_or_none(client: Client) -> None:
    slots = NvencSemaphore(client.redis, "node-1", limit=4)
    with ladder.hold_slots(slots, "job-a", 3):
        assert slots.in_use() == 3
        with pytest.raises(NoNvencSlot):
            ladder.hold_slots(slots, "job-b", 2)  # one is free, two are needed
        assert slots.in_use() == 3  # the one it took is given back
    assert slots.in_use() == 0


def test_bad_ladders_are_one_line_and_queue_nothing(client: Client, ffmpeg: str) -> None:
    source = gop_clip(ffmpeg, client.settings.media / "bad.mp4", 1, "320x240")
    cases = [
        ({"renditions": [1000]}, "renditions: no bitrate for height 1000 (heights: 2160, "),
        ({"renditions": [480, 480]}, "renditions: a height is listed twice"),
        ({"package": "smooth"}, "package: "),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidSpec) as caught:
            submit_ladder(source, **kwargs, client=client)  # type: ignore[arg-type]
        assert str(caught.value).startswith(message), str(caught.value)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidSpec, match="a ladder's output is a folder, not a file"):
        submit_ladder(source, client.settings.media / "out.mp4", client=client)
    assert client.list() == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("package", ["hls", "dash"])
def test_a_ladder_from_one_decode_has_aligned_keyframes_in_every_variant(
    package: str,
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "talk.mp4", 9, "640x360")
    start_worker()
    job = submit_ladder(
        source,
        renditions=[720, 360, 240],
        package=package,
        segment_s=2,
        client=client,  # type: ignore[arg-type]
    )
    final = job.wait(timeout=180)
    assert final.state is JobState.SUCCEEDED, final.error
    result = final.result or {}
    assert result["skipped_heights"] == [720]  # above the 360p source
    assert [r["name"] for r in result["renditions"]] == ["360p", "240p"]
    folder = settings.media / f"talk.{package}"
    assert result["entry"] == f"talk.{package}/{ladder.ENTRY_FILES[package]}"
    assert (settings.media / result["entry"]).is_file()
    assert not list(settings.media.glob(".talk*")), "no temporary folder remains"
    # Read back independently of the worker: every variant, its size, frames and keyframes.
    rungs = ladder.plan_renditions([360, 240], shown(640, 360))
    src = read_facts(source)
    variants = ladder.variant_facts(folder, LadderSpec.model_validate(final.spec), rungs)
    assert [(v.width, v.height) for v in variants] == [(640, 360), (426, 240)]
    assert all(v.frames == src.frames == 270 for v in variants)
    keyframes = [[round(k, 3) for k in v.keyframes] for v in variants]
    assert keyframes[0] == keyframes[1]
    starts = [round(k - keyframes[0][0], 3) for k in keyframes[0]]
    assert starts == [0.0, 2.0, 4.0, 6.0, 8.0]  # one per 2 s segment
    if package == "hls":
        master = (folder / "master.m3u8").read_text()
        assert master.count("#EXT-X-STREAM-INF:") == 2
        for line in master.splitlines():
            if line.startswith("#EXT-X-STREAM-INF:"):
                assert "BANDWIDTH=" in line and "RESOLUTION=" in line
                assert 'CODECS="avc1.' in line and "mp4a.40.2" in line
        assert len(list((folder / "360p").glob("init*.mp4"))) == 1
    else:
        mpd = (folder / "manifest.mpd").read_text()
        assert 'height="360"' in mpd and 'height="240"' in mpd and "audio/mp4" in mpd


BAD_CLI = [
    (["--ladder", "1080,abc"], "--ladder takes heights like 1080,720,480, got '1080,abc'"),
    (["--ladder", "720", "--hls", "--dash"], "--hls and --dash are two ladders"),
    (["--ladder", "720", "--height", "480"], "--height does not apply to a ladder"),
    (["--dash", "--codec", "hevc"], "--codec does not apply to a ladder"),
    (["--ladder", "1000"], "renditions: no bitrate for height 1000"),
    (["--hls", "--audio", "copy"], "audio: Input should be 'aac' or 'none'"),
    (["--split", "x"], "--split takes a number of pieces or auto, got 'x'"),
    (["--split", "0"], "split: must be auto or 1..64 pieces, got 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CLI)
def test_bad_ladder_and_split_options_are_one_line(
    settings: Settings, ffmpeg: str, args: list[str], message: str
) -> None:
    from tests.test_cli import assert_nothing_queued, gpujobs

    source = gop_clip(ffmpeg, settings.media / "cli.mp4", 1, "320x240")
    result = gpujobs("submit", str(source), *args)
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert_nothing_queued(settings.broker_url or "")


@pytest.mark.timeout(240)
def test_the_cli_makes_a_dash_ladder_and_says_where(
    settings: Settings, ffmpeg: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    from tests.test_cli import gpujobs

    source = gop_clip(ffmpeg, settings.media / "show.mp4", 4, "640x360")
    start_worker()
    result = gpujobs("submit", str(source), "--ladder", "360,240", "--dash", "--wait", timeout=200)
    assert result.returncode == 0, result.stderr
    entry = settings.media / "show.dash" / "manifest.mpd"
    assert f"succeeded: {entry}" in result.stdout.replace("\n", "")
    assert entry.is_file()


@pytest.mark.timeout(300)
def test_a_split_ladder_is_made_per_piece_and_packaged_once(
    client: Client,
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    ffmpeg: str,
) -> None:
    source = gop_clip(ffmpeg, settings.media / "long.mp4", 12, "640x360")
    start_worker("--hostname", "a@test")
    start_worker("--hostname", "b@test")
    job = submit_ladder(source, renditions=[360, 240], segment_s=2, split=2, client=client)
    final = job.wait(timeout=240)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.pieces is not None and len(final.pieces) == 2
    for piece_id in final.pieces:
        piece = client.store.get(piece_id)
        assert piece is not None and piece.state is JobState.SUCCEEDED
        assert piece.spec["package"] == "mp4" and piece.parent == job.id
    folder = settings.media / "long.hls"
    rungs = ladder.plan_renditions([360, 240], shown(640, 360))
    variants = ladder.variant_facts(folder, LadderSpec.model_validate(final.spec), rungs)
    src = read_facts(source)
    assert all(v.frames == src.frames == 360 and v.monotonic for v in variants)
    assert src.audio_end_s is not None
    for v in variants:  # the source's audio, once for the whole, no gap at the cut
        assert v.audio_end_s is not None and v.audio_gaps == 0
        # It ends with the video as in the source (a copied AAC's priming may shift both).
        lag, source_lag = v.audio_end_s - v.video_end_s, src.audio_end_s - src.video_end_s
        assert abs(lag - source_lag) <= 0.05, (v, src)
    keyframes = [[round(k, 3) for k in v.keyframes] for v in variants]
    assert keyframes[0] == keyframes[1]
    # Every 2 s from each piece's start (the cut is a source keyframe, 6 s here).
    starts = [round(k - keyframes[0][0], 3) for k in keyframes[0]]
    assert starts == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0], starts
    master = (folder / "master.m3u8").read_text()
    assert master.count("#EXT-X-STREAM-INF:") == 2 and "mp4a.40.2" in master
    assert not list(settings.media.glob(".long*")), "no work or temporary folder remains"
