"""What a media file holds, read from `ffmpeg -i` (imageio-ffmpeg ships ffmpeg, not ffprobe)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 30.0

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
