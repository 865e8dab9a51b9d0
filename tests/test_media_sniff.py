"""The producer's sniff of a file's first bytes: what it takes for video, and the demuxer it
names for the header read at submit, checked against what libavformat itself picks for files
of every container the bundled ffmpeg writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import pytest

from gpujobs.media import SNIFF_BYTES, check_input, looks_like_video, sniffed_demuxer

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
