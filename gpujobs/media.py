"""What a media file holds: the producer's cheap check (`looks_like_video`, the first bytes only,
no ffmpeg needed) and the worker's probe (`probe`, read from `ffmpeg -i`; imageio-ffmpeg ships
ffmpeg, not ffprobe)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 30.0
SNIFF_BYTES = 4096
# ISO base media (mp4, mov, m4v, 3gp): a box type at offset 4.
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}

_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+)(.*)")
_AUDIO = re.compile(r"Stream #\d+:\d+.*?: Audio: (\w+)")
_SIZE = re.compile(r"[ ,](\d{1,5})x(\d{1,5})[ ,\[]")
_FPS = re.compile(r"([\d.]+) fps")


class ProbeError(Exception):
    """The file is not media ffmpeg can read; the message says why in one line."""


@dataclass(frozen=True)
class MediaInfo:
    """duration_s: seconds (container); width/height: pixels; fps: frames per second."""

    duration_s: float
    video_codec: str
    width: int
    height: int
    fps: float | None
    audio_codec: str | None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


def parse_probe(text: str) -> MediaInfo:
    """Read ffmpeg's description of an input (its stderr for `ffmpeg -i FILE`)."""
    video = _VIDEO.search(text)
    if video is None:
        raise ProbeError("no video stream")
    size = _SIZE.search(video.group(2) + " ")
    if size is None:
        raise ProbeError("video stream has no size")
    duration = _DURATION.search(text)
    if duration is None:
        raise ProbeError("unknown duration")
    hours, minutes, seconds = duration.groups()
    fps = _FPS.search(video.group(2))
    audio = _AUDIO.search(text)
    return MediaInfo(
        duration_s=int(hours) * 3600 + int(minutes) * 60 + float(seconds),
        video_codec=video.group(1),
        width=int(size.group(1)),
        height=int(size.group(2)),
        fps=float(fps.group(1)) if fps else None,
        audio_codec=audio.group(1) if audio else None,
    )


def probe(ffmpeg: str, path: Path) -> MediaInfo:
    """Probe a file. ProbeError carries ffmpeg's own reason when it cannot read it."""
    result = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    text = result.stderr
    if "Input #0" not in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "ffmpeg could not read it"
        raise ProbeError(reason.split(": ", 1)[-1] if str(path) in reason else reason)
    return parse_probe(text)


def looks_like_video(path: Path) -> bool:
    """True when the file starts like a container ffmpeg reads video from."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if len(head) < 12:
        return False
    if head[4:8] in _ISO_BOXES:
        return True
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska, WebM
        return True
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[0] == 0x47 and (len(head) < 189 or head[188] == 0x47):  # MPEG-TS sync bytes
        return True
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):  # MPEG-PS, MPEG-1/2 video
        return True
    if head.startswith((b"FLV", b"OggS", b"YUV4MPEG2")):
        return True
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):  # ASF / WMV
        return True
    return head.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))  # raw H.264/HEVC Annex B
