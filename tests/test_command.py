"""The exact ffmpeg commands of the three encode paths, and the parsers around ffmpeg."""

from __future__ import annotations

import pytest

from gpujobs.media import MediaInfo, ProbeError, parse_probe
from gpujobs.specs import TranscodeSpec
from workers.gpu.discovery import NO_GPU, Capabilities
from workers.transcode.command import (
    EncodePath,
    NoGpuPath,
    build_command,
    choose_path,
    output_size,
    parse_progress_block,
    validate_output,
    with_progress,
)

SEED = TranscodeSpec(input="IN.mp4", output="OUT.mp4")
H100 = Capabilities(gpu_name="NVIDIA H100", nvenc=False, cuda_decode=True, scale_cuda=True)
RTX = Capabilities(
    gpu_name="NVIDIA GeForce RTX 5090", nvenc=True, cuda_decode=True, scale_cuda=True
)


def test_gpu_command_is_exactly_the_one_teams_run() -> None:
    command = build_command("ffmpeg", SEED, EncodePath.NVENC, "IN", "OUT", 854, 480)
    # ffmpeg -hwaccel cuda -hwaccel_output_format cuda -threads 2 -i IN -vf scale_cuda=854:480
    #        -c:v h264_nvenc -preset p1 -cq 28 -c:a copy -y OUT
    assert command == [
        "ffmpeg", "-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-threads", "2",
        "-i", "IN", "-vf", "scale_cuda=854:480", "-c:v", "h264_nvenc", "-preset", "p1",
        "-cq", "28", "-c:a", "copy", "-y", "OUT",
    ]  # fmt: skip


def test_gpu_without_nvenc_scales_on_the_card_and_encodes_on_the_cpu() -> None:
    command = build_command("ffmpeg", SEED, EncodePath.CUDA_DECODE, "IN", "OUT", 854, 480)
    assert command == [
        "ffmpeg", "-hwaccel", "cuda", "-hwaccel_output_format", "cuda", "-threads", "2",
        "-i", "IN", "-vf", "scale_cuda=854:480:format=yuv420p,hwdownload,format=yuv420p",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "28", "-c:a", "copy", "-y", "OUT",
    ]  # fmt: skip


def test_cpu_path_maps_preset_and_cq() -> None:
    spec = TranscodeSpec(
        input="IN.mp4", output="OUT.mkv", codec="hevc", preset="p6", cq=23, audio="aac", threads=4
    )
    command = build_command("ffmpeg", spec, EncodePath.CPU, "IN", "OUT", 1280, 720)
    assert command == [
        "ffmpeg", "-threads", "4", "-i", "IN", "-vf", "scale=1280:720,format=yuv420p",
        "-c:v", "libx265", "-preset", "medium", "-crf", "23", "-c:a", "aac", "-b:a", "128k",
        "-y", "OUT",
    ]  # fmt: skip


def test_no_audio_drops_the_stream() -> None:
    spec = TranscodeSpec(input="IN.mp4", output="OUT.mp4", audio="none")
    assert build_command("ffmpeg", spec, EncodePath.CPU, "IN", "OUT", 2, 2)[-3:] == [
        "-an",
        "-y",
        "OUT",
    ]


def test_progress_flags_follow_the_binary() -> None:
    assert with_progress(["ffmpeg", "-i", "x"])[:6] == [
        "ffmpeg",
        "-hide_banner",
        "-nostdin",
        "-progress",
        "pipe:1",
        "-nostats",
    ]


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


def test_missing_width_keeps_aspect_even() -> None:
    source = MediaInfo(20.0, "h264", 1920, 1080, 30.0, "aac")
    assert output_size(SEED, source) == (854, 480)
    assert output_size(TranscodeSpec(input="a.mp4", output="b.mp4", height=720), source) == (
        1280,
        720,
    )


def test_progress_block_parsing() -> None:
    sample = parse_progress_block(
        {"frame": "300", "fps": "151.2", "out_time_us": "10000000", "speed": "5.04x",
         "progress": "continue"}
    )  # fmt: skip
    assert (sample.out_time_s, sample.fps, sample.speed, sample.done) == (10.0, 151.2, 5.04, False)
    end = parse_progress_block({"out_time_us": "N/A", "speed": "N/A", "progress": "end"})
    assert (end.out_time_s, end.speed, end.done) == (0.0, None, True)


PROBE_TEXT = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':
  Duration: 00:01:02.50, start: 0.000000, bitrate: 15531 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 1920x1080 [SAR 1:1 DAR 16:9], 15448 kb/s, 29.97 fps, 30 tbr, 15360 tbn (default)
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 69 kb/s (default)
"""  # noqa: E501


def test_probe_parsing() -> None:
    info = parse_probe(PROBE_TEXT)
    assert info == MediaInfo(62.5, "h264", 1920, 1080, 29.97, "aac")
    with pytest.raises(ProbeError, match="no video stream"):
        parse_probe(
            "Input #0, wav, from 'x.wav':\n  Duration: 00:00:01.00\n  Stream #0:0: Audio: pcm_s16le"
        )


def test_validation_catches_broken_outputs() -> None:
    source = MediaInfo(20.0, "h264", 1920, 1080, 30.0, "aac")
    good = MediaInfo(20.05, "h264", 854, 480, 30.0, "aac")
    assert validate_output(good, source, SEED, 854, 480) is None
    assert "lasts" in str(
        validate_output(MediaInfo(15.0, "h264", 854, 480, 30.0, "aac"), source, SEED, 854, 480)
    )
    assert "854x480" in str(
        validate_output(MediaInfo(20.0, "h264", 640, 480, 30.0, "aac"), source, SEED, 854, 480)
    )
    assert "no audio" in str(
        validate_output(MediaInfo(20.0, "h264", 854, 480, 30.0, None), source, SEED, 854, 480)
    )
    assert "codec" in str(
        validate_output(MediaInfo(20.0, "hevc", 854, 480, 30.0, "aac"), source, SEED, 854, 480)
    )
