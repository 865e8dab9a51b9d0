"""The producer's sniff of a file's first bytes: what it takes for video, and the demuxer it
names for the header read at submit, checked against what libavformat itself picks for files
of every container the bundled ffmpeg writes."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import av
import pytest

from gpujobs.containers import SNIFF_BYTES, looks_like_video, sniffed_demuxer
from gpujobs.media import COVER_ONLY, NOT_VIDEO, STILL_IMAGE, check_input, input_verdict

# (file name, extra ffmpeg arguments): containers people send, written by the bundled ffmpeg.
CONTAINERS = [
    ("a.mp4", []),
    ("a.mov", []),
    ("a.m4v", []),
    ("a.3gp", ["-s", "176x144"]),
    ("fragmented.mp4", ["-movflags", "frag_keyframe+empty_moov"]),
    ("a.mkv", []),
    ("a.webm", ["-c:v", "libvpx", "-deadline", "realtime"]),
    ("a.ts", []),
    ("a.avi", []),
    ("a.flv", []),
]


@pytest.mark.parametrize(("name", "extra"), CONTAINERS)
def test_a_named_demuxer_is_the_one_libavformat_guesses(
    tmp_path: Path, ffmpeg: str, name: str, extra: list[str]
) -> None:
    path = tmp_path / name
    subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc2=size=320x180:rate=25:duration=0.4", *extra, str(path)],
                   check=True)  # fmt: skip
    head = path.read_bytes()[:SNIFF_BYTES]
    assert looks_like_video(head)
    named = sniffed_demuxer(head)
    with av.open(str(path)) as container:
        guessed = container.format.name.split(",")
    if named is not None:
        assert named in guessed, (named, guessed)
        with av.open(str(path), format=named) as container:
            assert container.streams.video[0].codec_context.width > 0
    # The check at submit reads it either way, and finds its video.
    assert check_input(path, named).width == (176 if name.endswith(".3gp") else 320)


def test_what_is_not_a_container_names_no_demuxer() -> None:
    for head in (b"", b"hello, world\n" * 20, b"%PDF-1.7\n" + bytes(64), b"ID3\x04" + bytes(64)):
        assert sniffed_demuxer(head) is None
        assert not looks_like_video(head)


# (file name, ffmpeg arguments after the lavfi inputs): containers and streams ffmpeg reads that
# no first-bytes rule knows (broadcast MXF, camcorder DV and AVCHD, GIF, IVF, an IP camera's raw
# MJPEG, a TS cut mid-packet): libavformat's guess decides, and takes them.
GUESSED = [
    ("broadcast.mxf", ["-c:v", "mpeg2video", "-c:a", "pcm_s16le"]),
    ("camcorder.dv", ["-s", "720x480", "-r", "30000/1001", "-c:v", "dvvideo", "-pix_fmt",
                      "yuv411p", "-c:a", "pcm_s16le", "-ac", "2", "-f", "dv"]),
    ("avchd.m2ts", ["-c:v", "libx264", "-c:a", "ac3", "-mpegts_m2ts_mode", "1"]),
    ("animation.gif", ["-an"]),
    ("vp8.ivf", ["-an", "-c:v", "libvpx", "-deadline", "realtime"]),
    ("camera.mjpeg", ["-an", "-c:v", "mjpeg"]),
]  # fmt: skip


def make(ffmpeg: str, path: Path, *args: str) -> Path:
    subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args,
                    str(path)], check=True)  # fmt: skip
    return path


@pytest.mark.parametrize(("name", "extra"), GUESSED)
def test_containers_not_known_by_sight_are_left_to_libavformat(
    tmp_path: Path, ffmpeg: str, name: str, extra: list[str]
) -> None:
    path = make(ffmpeg, tmp_path / name, "-f", "lavfi", "-i",
                "testsrc2=size=320x240:rate=25:duration=0.4", "-f", "lavfi", "-i",
                "sine=sample_rate=48000:duration=0.4", *extra)  # fmt: skip
    assert not looks_like_video(path.read_bytes()[:SNIFF_BYTES])
    assert input_verdict(path, path.stat()) is None


def test_a_ts_cut_mid_packet_is_a_video(tmp_path: Path, ffmpeg: str) -> None:
    whole = make(ffmpeg, tmp_path / "whole.ts", "-f", "lavfi", "-i",
                 "testsrc2=size=320x240:rate=25:duration=0.4", "-c:v", "libx264")  # fmt: skip
    cut = tmp_path / "cut.ts"
    cut.write_bytes(whole.read_bytes()[100:])
    assert input_verdict(cut, cut.stat()) is None


def test_stills_text_and_audio_are_refused_with_their_reason(tmp_path: Path, ffmpeg: str) -> None:
    still = ["-f", "lavfi", "-i", "testsrc2=size=320x240", "-frames:v", "1"]
    png = make(ffmpeg, tmp_path / "still.png", *still)
    jpg = make(ffmpeg, tmp_path / "still.jpg", *still)
    song = make(ffmpeg, tmp_path / "song.mp3", "-f", "lavfi", "-i", "sine=duration=0.5", "-i",
                str(jpg), "-map", "0", "-map", "1", "-c:v", "copy", "-disposition:v",
                "attached_pic")  # fmt: skip
    plain = make(ffmpeg, tmp_path / "plain.mp3", "-f", "lavfi", "-i", "sine=duration=0.5")
    notes = tmp_path / "notes.txt"  # libavformat's tty demuxer shows any .txt as video
    notes.write_text("minutes of the meeting\n" * 40)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(random.Random(7).randbytes(8192))
    verdicts = {p.name: input_verdict(p, p.stat()) for p in (png, jpg, song, plain, notes, noise)}
    assert verdicts == {
        "still.png": STILL_IMAGE,
        "still.jpg": STILL_IMAGE,
        "song.mp3": "no video stream (audio with cover art)",
        "plain.mp3": "no video stream (audio only)",
        "notes.txt": NOT_VIDEO,
        "noise.mp4": NOT_VIDEO,
    }


def test_one_picture_beside_audio_is_a_cover_even_unflagged(tmp_path: Path, ffmpeg: str) -> None:
    # An MP3's cover remuxed into Matroska becomes a one-picture MJPEG track, not flagged as an
    # attached picture; an old camera's MJPEG video has a picture per frame.
    jpg = make(ffmpeg, tmp_path / "cover.jpg", "-f", "lavfi", "-i", "testsrc2=size=300x300",
               "-frames:v", "1")  # fmt: skip
    song = make(ffmpeg, tmp_path / "song.mp3", "-f", "lavfi", "-i", "sine=duration=1", "-i",
                str(jpg), "-map", "0", "-map", "1", "-c:v", "copy", "-disposition:v",
                "attached_pic")  # fmt: skip
    remuxed = make(ffmpeg, tmp_path / "song.mkv", "-i", str(song), "-c", "copy")
    still = make(ffmpeg, tmp_path / "still.mkv", "-i", str(jpg), "-c", "copy")
    camera = make(ffmpeg, tmp_path / "camera.avi", "-f", "lavfi", "-i",
                  "testsrc2=size=320x240:rate=10:duration=0.5", "-f", "lavfi", "-i",
                  "sine=duration=0.5", "-c:v", "mjpeg", "-c:a", "pcm_s16le")  # fmt: skip
    verdicts = {p.name: input_verdict(p, p.stat()) for p in (remuxed, still, camera)}
    assert verdicts == {"song.mkv": COVER_ONLY, "still.mkv": STILL_IMAGE, "camera.avi": None}
