"""The exact ffmpeg commands of the three encode paths for each kind of input (8-bit, 10-bit,
rotated, interlaced, anamorphic, too wide for NVDEC), stream choices, validation and failure
reasons. Inputs are MediaInfo values as PyAV reports them; no GPU is needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpujobs.media import MediaInfo, StreamInfo, explain
from gpujobs.specs import TranscodeSpec
from tests.helpers import wait_for
from workers.gpu.discovery import NO_GPU, Capabilities
from workers.transcode.command import (
    X264_PRESETS,
    EncodePath,
    NoGpuPath,
    Route,
    build_command,
    choose_path,
    output_size,
    parse_progress_block,
    route,
    with_progress,
)
from workers.transcode.plan import Plan, aac_bitrate, plan_streams
from workers.transcode.validate import failure_reason, family, validate_output

SEED = TranscodeSpec(input="IN.mp4", output="OUT.mp4")
H100 = Capabilities(gpu_name="NVIDIA H100", nvenc=False, cuda_decode=True, scale_cuda=True)
RTX = Capabilities(
    gpu_name="NVIDIA GeForce RTX 5090", nvenc=True, cuda_decode=True, scale_cuda=True
)
GPU_IN = ["ffmpeg", "-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-noautorotate",
          "-threads", "2", "-i", "IN"]  # fmt: skip
CPU_IN = ["ffmpeg", "-noautorotate", "-threads", "2", "-i", "IN"]
MP4_OUT = ["-fps_mode", "passthrough", "-movflags", "+faststart", "-y", "OUT"]


def video(**kw: Any) -> StreamInfo:
    base: dict[str, Any] = {
        "index": 0, "kind": "video", "kind_index": 0, "codec": "h264", "width": 1920,
        "height": 1080, "pix_fmt": "yuv420p", "field_order": "progressive", "duration_s": 20.0,
        "frames": 600, "dispositions": frozenset({"default"}),
    }  # fmt: skip
    return StreamInfo(**{**base, **kw})


def audio(index: int = 1, codec: str = "aac", channels: int = 2, **kw: Any) -> StreamInfo:
    fields = {
        "index": index,
        "kind": "audio",
        "kind_index": index - 1,
        "codec": codec,
        "channels": channels,
        "duration_s": 20.0,
    }
    return StreamInfo(**{**fields, **kw})


def media(*streams: StreamInfo, duration: float | None = 20.0) -> MediaInfo:
    return MediaInfo(format="mov,mp4", duration_s=duration, size_bytes=1, streams=streams)


SOURCE = media(video(), audio())


def command(spec: TranscodeSpec, source: MediaInfo, path: EncodePath) -> list[str]:
    plan = plan_streams(spec, source)
    return build_command("ffmpeg", spec, plan, route(path, plan.video), "IN", "OUT")


def test_gpu_command_is_the_one_teams_run_with_streams_mapped_and_square_pixels() -> None:
    assert command(SEED, SOURCE, EncodePath.NVENC) == [
        *GPU_IN, "-map", "0:v:0", "-map", "0:1", "-vf", "scale_cuda=854:480,setsar=1",
        "-c:v", "h264_nvenc", "-preset", "p1", "-cq", "28", "-c:a:0", "copy", *MP4_OUT,
    ]  # fmt: skip


def test_gpu_without_nvenc_scales_on_the_card_and_encodes_on_the_cpu() -> None:
    assert command(SEED, SOURCE, EncodePath.CUDA_DECODE) == [
        *GPU_IN, "-map", "0:v:0", "-map", "0:1",
        "-vf", "scale_cuda=854:480:format=yuv420p,hwdownload,format=yuv420p,setsar=1",
        "-c:v", "libx264", "-preset", "superfast", "-crf", "28", "-c:a:0", "copy", *MP4_OUT,
    ]  # fmt: skip


def test_cpu_path_maps_preset_and_cq_and_tags_hevc() -> None:
    spec = TranscodeSpec(input="IN.mp4", output="OUT.mov", codec="hevc", preset="p6", cq=23,
                         audio="aac", threads=4)  # fmt: skip
    assert command(spec, SOURCE, EncodePath.CPU)[4:] == [
        "-i", "IN", "-map", "0:v:0", "-map", "0:1", "-vf", "scale=854:480,format=yuv420p,setsar=1",
        "-c:v", "libx265", "-preset", "slow", "-crf", "23", "-tag:v", "hvc1",
        "-c:a:0", "aac", "-b:a:0", "128k", *MP4_OUT,
    ]  # fmt: skip


def test_no_cpu_preset_is_faster_than_superfast() -> None:
    # ultrafast turns off CABAC and B-frames: Baseline-profile files nobody asked for.
    assert "ultrafast" not in X264_PRESETS.values()
    assert X264_PRESETS["p1"] == "superfast"


def test_ten_bit_input_is_converted_on_the_card() -> None:
    ten = media(video(pix_fmt="yuv420p10le", bit_depth=10, codec="hevc"), audio())
    h264 = command(SEED, ten, EncodePath.NVENC)
    assert h264[h264.index("-vf") + 1] == "scale_cuda=854:480:format=yuv420p,setsar=1"
    hevc_spec = TranscodeSpec(input="IN.mp4", output="OUT.mp4", codec="hevc")
    hevc = command(hevc_spec, ten, EncodePath.NVENC)
    assert hevc[hevc.index("-vf") + 1] == "scale_cuda=854:480:format=p010le,setsar=1"
    assert hevc[hevc.index("-c:v") :][:8] == [
        "-c:v", "hevc_nvenc", "-preset", "p1", "-cq", "28", "-profile:v", "main10",
    ]  # fmt: skip
    assert hevc[hevc.index("-tag:v") :][:2] == ["-tag:v", "hvc1"]
    down = command(hevc_spec, ten, EncodePath.CUDA_DECODE)
    assert down[down.index("-vf") + 1] == (
        "scale_cuda=854:480:format=p010le,hwdownload,format=p010le,format=yuv420p10le,setsar=1"
    )


def test_rotated_phone_video_is_turned_upright_on_every_path() -> None:
    phone = media(video(width=1280, height=720, rotation=90), audio())
    gpu = command(SEED, phone, EncodePath.NVENC)
    assert gpu[gpu.index("-vf") + 1] == (
        "transpose_cuda=dir=clock,sidedata=mode=delete:type=DISPLAYMATRIX,"
        "scale_cuda=270:480,setsar=1"
    )
    cpu = command(SEED, phone, EncodePath.CPU)
    assert cpu[cpu.index("-vf") + 1] == (
        "transpose=clock,sidedata=mode=delete:type=DISPLAYMATRIX,scale=270:480,format=yuv420p,"
        "setsar=1"
    )
    upside_down = media(video(rotation=180))
    gpu180 = command(SEED, upside_down, EncodePath.NVENC)
    assert gpu180[gpu180.index("-vf") + 1].startswith("transpose_cuda=dir=reversal,sidedata=")
    cpu180 = command(SEED, upside_down, EncodePath.CPU)
    assert cpu180[cpu180.index("-vf") + 1].startswith("hflip,vflip,sidedata=")
    assert "-noautorotate" in gpu and "-noautorotate" in cpu


def test_interlaced_input_is_deinterlaced_on_every_path() -> None:
    tff = media(video(field_order="tt"), audio())
    gpu = command(SEED, tff, EncodePath.NVENC)
    assert gpu[gpu.index("-vf") + 1] == (
        "bwdif_cuda=mode=send_frame:parity=auto:deint=all,scale_cuda=854:480,setsar=1"
    )
    cpu = command(SEED, tff, EncodePath.CPU)
    assert cpu[cpu.index("-vf") + 1] == (
        "bwdif=mode=send_frame:parity=auto:deint=all,scale=854:480,format=yuv420p,setsar=1"
    )


def test_h264_too_wide_for_nvdec_decodes_on_the_cpu_with_the_reason() -> None:
    wide = media(video(width=5760, height=1080), audio())
    plan = plan_streams(SEED, wide)
    nvenc = route(EncodePath.NVENC, plan.video)
    assert nvenc == Route(EncodePath.NVENC, gpu_decode=False,
                          fallback="CPU decode: NVDEC decodes h264 up to 4096x4096; "
                          "this is 5760x1080")  # fmt: skip
    assert build_command("ffmpeg", SEED, plan, nvenc, "IN", "OUT") == [
        *CPU_IN, "-map", "0:v:0", "-map", "0:1",
        "-vf", "scale=2560:480,format=yuv420p,setsar=1",
        "-c:v", "h264_nvenc", "-preset", "p1", "-cq", "28", "-c:a:0", "copy", *MP4_OUT,
    ]  # fmt: skip
    cuda = route(EncodePath.CUDA_DECODE, plan.video)
    assert cuda.path is EncodePath.CPU and cuda.fallback and "4096" in cuda.fallback
    high10 = media(video(pix_fmt="yuv420p10le", bit_depth=10))
    assert "8-bit 4:2:0" in str(route(EncodePath.NVENC, plan_streams(SEED, high10).video).fallback)
    prores = media(video(codec="prores"))
    assert route(EncodePath.NVENC, prores.video).fallback == (  # type: ignore[arg-type]
        "CPU decode: NVDEC does not decode prores"
    )


def test_anamorphic_source_is_sized_from_its_displayed_aspect() -> None:
    ntsc = media(video(width=720, height=480, sar=Fraction(32, 27)))
    assert output_size(SEED, ntsc.video) == (854, 480)  # type: ignore[arg-type]
    assert output_size(SEED, video()) == (854, 480)
    assert output_size(TranscodeSpec(input="a.mp4", output="b.mp4", height=720), video()) == (
        1280, 720,
    )  # fmt: skip


def test_a_rate_is_forced_only_on_request() -> None:
    spec = TranscodeSpec(input="IN.mp4", output="OUT.mkv", fps=25)
    out = command(spec, SOURCE, EncodePath.CPU)
    assert out[-6:] == ["-fps_mode", "cfr", "-r", "25", "-y", "OUT"]  # no faststart in MKV


def test_streams_chosen_on_purpose_and_recorded() -> None:
    cover = StreamInfo(index=3, kind="video", kind_index=1, codec="mjpeg", width=600,
                       height=600, dispositions=frozenset({"attached_pic"}))  # fmt: skip
    data = StreamInfo(index=4, kind="data", kind_index=0, codec="none")
    subs = StreamInfo(index=5, kind="subtitle", kind_index=0, codec="subrip")
    pgs = StreamInfo(index=6, kind="subtitle", kind_index=1, codec="hdmv_pgs_subtitle")
    source = media(video(), audio(1, "pcm_s16le", 2), audio(2, "ac3", 6), cover, data, subs, pgs)
    spec = TranscodeSpec(input="IN.mov", output="OUT.mp4", subtitles="keep")
    plan = plan_streams(spec, source)
    assert plan.record() == [
        {"index": 0, "kind": "video", "codec": "h264", "action": "converted", "to": "h264"},
        {"index": 1, "kind": "audio", "codec": "pcm_s16le", "action": "converted", "to": "aac",
         "why": ".mp4 cannot carry pcm_s16le", "bitrate": "128k"},
        {"index": 2, "kind": "audio", "codec": "ac3", "action": "kept"},
        {"index": 3, "kind": "video", "codec": "mjpeg", "action": "dropped", "why": "cover art"},
        {"index": 4, "kind": "data", "codec": "none", "action": "dropped", "why": "data stream"},
        {"index": 5, "kind": "subtitle", "codec": "subrip", "action": "converted",
         "to": "mov_text"},
        {"index": 6, "kind": "subtitle", "codec": "hdmv_pgs_subtitle", "action": "dropped",
         "why": "bitmap subtitles cannot become text"},
    ]  # fmt: skip
    cmd = build_command("ffmpeg", spec, plan, route(EncodePath.CPU, plan.video), "IN", "OUT")
    maps = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-map"]
    assert maps == ["0:v:0", "0:1", "0:2", "0:5"]
    assert cmd[cmd.index("-c:a:0") :][:8] == [
        "-c:a:0", "aac", "-b:a:0", "128k", "-c:a:1", "copy", "-c:s:0", "mov_text",
    ]  # fmt: skip
    first = plan_streams(spec.model_copy(update={"audio_tracks": "first"}), source)
    assert [c.index for c in first.audio] == [1]
    assert [c.action for c in plan_streams(SEED, source).subtitles] == []  # drop by default


def test_only_cover_art_means_no_video() -> None:
    cover = StreamInfo(index=1, kind="video", kind_index=0, codec="png", width=600, height=600,
                       dispositions=frozenset({"attached_pic"}))  # fmt: skip
    with pytest.raises(ValueError, match=r"no video stream \(audio with cover art\)"):
        plan_streams(SEED, media(audio(0), cover))


def test_aac_bitrate_follows_the_channel_layout() -> None:
    assert [aac_bitrate(n) for n in (1, 2, 6, 8)] == ["96k", "128k", "384k", "512k"]


def test_progress_flags_follow_the_binary() -> None:
    assert with_progress(["ffmpeg", "-i", "x"])[:8] == [
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "level+info", "-progress", "pipe:1",
        "-nostats",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("caps", "policy", "expected"),
    [
        (RTX, "auto", EncodePath.NVENC),
        (H100, "auto", EncodePath.CUDA_DECODE),
        (NO_GPU, "auto", EncodePath.CPU),
        (RTX, "forbid", EncodePath.CPU),
        (H100, "require", EncodePath.CUDA_DECODE),
    ],
)
def test_path_choice(caps: Capabilities, policy: str, expected: EncodePath) -> None:
    spec = TranscodeSpec(input="a.mp4", output="b.mp4", gpu=policy)  # type: ignore[arg-type]
    assert choose_path(spec, caps) is expected


def test_require_gpu_without_one_fails() -> None:
    spec = TranscodeSpec(input="a.mp4", output="b.mp4", gpu="require")
    with pytest.raises(NoGpuPath):
        choose_path(spec, NO_GPU)


def test_progress_block_parsing() -> None:
    sample = parse_progress_block(
        {"frame": "300", "fps": "151.2", "out_time_us": "10000000", "speed": "5.04x",
         "progress": "continue"}
    )  # fmt: skip
    assert (sample.out_time_s, sample.fps, sample.speed, sample.done, sample.frame) == (
        10.0, 151.2, 5.04, False, 300,
    )  # fmt: skip
    end = parse_progress_block({"out_time_us": "N/A", "speed": "N/A", "progress": "end"})
    assert (end.out_time_s, end.speed, end.done) == (0.0, None, True)


def out(width: int = 854, height: int = 480, *streams: StreamInfo, **kw: Any) -> MediaInfo:
    v = video(width=width, height=height, **kw)
    return media(v, *(streams or (audio(),)))


def test_validation_knows_media() -> None:
    plan: Plan = plan_streams(SEED, SOURCE)
    assert validate_output(out(), SOURCE, SEED, plan) is None
    assert "lasts" in str(validate_output(out(duration_s=15.0), SOURCE, SEED, plan))
    assert "854x480" in str(validate_output(out(640), SOURCE, SEED, plan))
    assert "square" in str(validate_output(out(sar=Fraction(4, 3)), SOURCE, SEED, plan))
    assert "0 audio tracks" in str(
        validate_output(media(video(width=854, height=480)), SOURCE, SEED, plan)
    )
    assert "codec is hevc" in str(validate_output(out(codec="hevc"), SOURCE, SEED, plan))
    # MP2 copied into MP4 reads back as mp3: one family.
    mp2 = media(video(), audio(codec="mp2"))
    assert validate_output(out(854, 480, audio(codec="mp3float")), mp2, SEED,
                           plan_streams(SEED, mp2)) is None  # fmt: skip
    assert family("mp2") == family("mp3") and family("pcm_s16le") == family("pcm_s24le")


def test_durations_are_those_of_the_streams_kept() -> None:
    longer = media(video(duration_s=1.0), audio(duration_s=3.0), duration=3.0)
    spec = TranscodeSpec(input="IN.mp4", output="OUT.mp4", audio="none")
    plan = plan_streams(spec, longer)
    one_second = media(video(width=854, height=480, duration_s=1.0), duration=1.0)
    assert validate_output(one_second, longer, spec, plan) is None


def test_no_duration_input_is_checked_against_decoded_frames() -> None:
    raw = media(video(duration_s=None, frames=None), duration=None)
    plan = plan_streams(SEED, raw)
    written = media(video(width=854, height=480, duration_s=2.0, frames=50), duration=2.0)
    assert validate_output(written, raw, SEED, plan, decoded_frames=50) is None
    assert "50 frames, ffmpeg wrote 60" in str(
        validate_output(written, raw, SEED, plan, decoded_frames=60)
    )


def test_failure_reason_is_the_line_that_names_the_cause() -> None:
    log = [
        "[info] Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'IN':",
        "[mp4 @ 0x55d5c0c8a2c0] [error] Could not find tag for codec pcm_s16le in stream #1, "
        "codec not currently supported in container",
        "[out#0/mp4 @ 0x55d5c0c89e00] [error] Could not write header (incorrect codec "
        "parameters ?): Invalid argument",
        "[error] Conversion failed!",
    ]
    assert failure_reason(log, 234) == (
        "Could not find tag for codec pcm_s16le in stream #1, codec not currently supported "
        "in container"
    )
    moov = ["[in#0 @ 0x5] [error] moov atom not found", "[fatal] Error opening input files: x"]
    assert failure_reason(moov, 1) == "the file is incomplete (no moov atom)"
    assert failure_reason(["[info] plain", "last words"], 1) == (
        "ffmpeg exited with 1: [info] plain | last words".replace("[info] ", "")
    )
    assert explain("moov atom not found") == "the file is incomplete (no moov atom)"


# A process that starts ffmpeg as the worker does, prints its pid, and waits to be killed.
# ffmpeg writes nothing, so no broken pipe can end it: only the parent-death signal.
_STARTER = """
import sys, time
from workers.transcode import command as tc
if sys.argv[2] == "preexec":  # as on a machine without util-linux's setpriv
    tc.shutil.which = lambda name: None
proc = tc.popen_dying_with_parent(
    [sys.argv[1], "-nostdin", "-nostats", "-loglevel", "quiet", "-re", "-f", "lavfi", "-i",
     "testsrc=duration=600", "-f", "null", "-"]
)
print(proc.pid, tc._pdeathsig_prefix() != (), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("way", ["setpriv", "preexec"])
def test_ffmpeg_dies_with_the_worker_that_started_it(ffmpeg: str, way: str) -> None:
    if sys.platform != "linux":
        pytest.skip("the parent-death signal is Linux's")
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, ffmpeg, way], stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    pid_text, through_setpriv = starter.stdout.readline().split()
    child = psutil.Process(int(pid_text))
    try:
        assert through_setpriv == str(way == "setpriv")
        # setpriv execs ffmpeg in its own place: the same process, ffmpeg once it runs.
        wait_for(lambda: "ffmpeg" in child.name(), timeout_s=30)
        starter.kill()  # SIGKILL: no handler of ours runs, only the kernel can end ffmpeg
        starter.wait()
        _, alive = psutil.wait_procs([child], timeout=30)
        assert not alive, "ffmpeg must die with the process that started it"
    finally:
        starter.kill()
        if child.is_running():
            os.killpg(child.pid, signal.SIGKILL)


def test_a_temporary_output_fits_where_its_output_fits_and_is_found_again(tmp_path: Path) -> None:
    from workers.transcode.command import NAME_MAX, stale_temporaries, temporary_output

    for stem in ("talk", "東京の夜景と雨の日の散歩道" * 6, "x[1]*?", "a" * 240):
        output = tmp_path / f"{stem}.mp4"
        assert len(output.name.encode()) <= NAME_MAX
        first, second = (temporary_output(output, "3f2a9c1b7d4e", n) for n in (1, 12))
        for temp in (first, second):
            assert len(temp.name.encode()) <= NAME_MAX and temp.suffix == ".mp4"
            temp.write_bytes(b"partial")  # the file system takes the name
        temporary_output(output, "000000000000", 1).write_bytes(b"")  # another job's
        assert sorted(stale_temporaries(output, "3f2a9c1b7d4e")) == sorted([first, second])
        first.unlink()
        second.unlink()


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("turn", [0, 90, 180, 270])
def test_every_display_matrix_is_shown_as_ffmpeg_shows_it(
    tmp_path: Path, ffmpeg: str, turn: int, hflip: bool
) -> None:
    """The eight display matrices (four turns, each also mirrored, as `-display_hflip` writes
    some front cameras'): the probe's rotation and mirror, through `upright`, give the picture
    pixel for pixel as ffmpeg's own autorotate renders it."""
    from gpujobs.media import probe
    from workers.transcode.command import upright

    def run(*args: str) -> bytes:
        return subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", *args],
                              capture_output=True, check=True).stdout  # fmt: skip

    coded = tmp_path / "coded.mp4"  # lossless, and no two of its eight orientations alike
    run("-f", "lavfi", "-i", "color=c=black:size=64x48:rate=10:duration=0.2,"
        "drawbox=x=0:y=0:w=20:h=10:color=white:t=fill,"
        "drawbox=x=50:y=20:w=14:h=28:color=gray:t=fill",
        "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", str(coded))  # fmt: skip
    shown = tmp_path / "shown.mp4"
    run("-display_rotation:v:0", str(turn), *(["-display_hflip:v:0"] if hflip else []),
        "-i", str(coded), "-c", "copy", str(shown))  # fmt: skip
    video = probe(shown).video
    assert video is not None and video.mirrored is hflip
    raw = ["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-"]
    theirs = run("-i", str(shown), *raw)  # ffmpeg's autorotate
    steps = upright(video.rotation, False, on_gpu=False, mirrored=video.mirrored)
    ours = run("-noautorotate", "-i", str(shown), *(["-vf", ",".join(steps)] if steps else []),
               *raw)  # fmt: skip
    assert ours == theirs
