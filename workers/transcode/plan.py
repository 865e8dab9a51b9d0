"""What a transcode will do with each stream of its input, decided from the probe (as data).

- **Video:** the main video stream only (never cover art or a one-frame thumbnail), sized from
  the *displayed* picture (SAR and rotation applied), square pixels, even sizes, upright;
  deinterlaced when the probe says it is interlaced.
- **Audio:** every track (`audio_tracks="all"`, default) or the first; with `audio="copy"` each
  track whose codec the output container holds is copied and the others are encoded to AAC at a
  bitrate by channel count; `audio="aac"` encodes all; `audio="none"` drops all.
- **Subtitles:** dropped by default; `subtitles="keep"` keeps text subtitles (as mov_text in
  MP4/MOV; as they are in Matroska, but MP4's mov_text, which Matroska cannot hold, as SRT);
  bitmap subtitles cannot become text and are dropped.
- **Data, timecode, attachments, cover art:** dropped.

Every stream of the input gets one `StreamChoice` (kept, converted or dropped, and why), which
the job's result records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from gpujobs.media import TEXT_SUBTITLES, MediaInfo, StreamInfo
from gpujobs.specs import MAX_SIDE, TranscodeSpec

# Audio codecs each output container carries as they are, on every ffmpeg build we support
# (Debian's 5.1 cannot put PCM in MP4 and wants -strict for FLAC there; 9.0 takes both: we
# rely on neither).
AUDIO_COPYABLE = {
    "mp4": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "opus", "alac"}),
    "mov": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "alac", "pcm_s16le", "pcm_s16be",
                      "pcm_s24le", "pcm_s24be", "pcm_s32le", "pcm_s32be", "pcm_f32le",
                      "pcm_f32be", "pcm_u8"}),
    "mkv": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "dts", "truehd", "opus", "vorbis",
                      "flac", "alac", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le",
                      "pcm_u8"}),
    "ts": frozenset({"aac", "mp3", "mp2", "ac3", "eac3", "dts", "truehd"}),
}  # fmt: skip
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "mkv", ".ts": "ts"}


def aac_bitrate(channels: int) -> str:
    """AAC bitrate for a channel count: 96k mono, 128k stereo, 384k up to 5.1, 512k beyond."""
    if channels <= 1:
        return "96k"
    if channels == 2:
        return "128k"
    if channels <= 6:
        return "384k"
    return "512k"


@dataclass(frozen=True)
class StreamChoice:
    """What happens to one input stream. action: kept (copied), converted (encoded to `to`) or
    dropped; why: the reason in words, when it is not the plain rule."""

    index: int
    kind: str
    codec: str
    action: str
    to: str | None = None
    why: str | None = None
    bitrate: str | None = None


@dataclass(frozen=True)
class Geometry:
    """The picture's way from input to output. width/height: output pixels (even, square
    pixels); rotation: clockwise turn to apply (0/90/180/270); mirrored: the display matrix
    flips the picture too; deinterlace: the input is interlaced; bit_depth: the input's."""

    width: int
    height: int
    rotation: int = 0
    mirrored: bool = False
    deinterlace: bool = False
    bit_depth: int = 8
    display_aspect: float = 0.0


@dataclass(frozen=True)
class Plan:
    video: StreamInfo
    geometry: Geometry
    audio: tuple[StreamChoice, ...]
    subtitles: tuple[StreamChoice, ...]
    choices: tuple[StreamChoice, ...]  # every input stream, in container order
    container: str

    @property
    def kept_streams(self) -> list[int]:
        return [c.index for c in self.choices if c.action != "dropped"]

    def record(self) -> list[dict[str, Any]]:
        """The choices as the job's result keeps them (None fields left out)."""
        return [{k: v for k, v in asdict(c).items() if v is not None} for c in self.choices]


def container_of(output: str) -> str:
    return CONTAINERS.get(PurePosixPath(output).suffix.lower(), "mp4")


def geometry(spec: TranscodeSpec, video: StreamInfo) -> Geometry:
    """Output size from the displayed picture: height as asked, width from the display aspect
    rounded to even (a portrait 720x1280 phone clip at height 480 -> 270x480; 720x480 with SAR
    32:27 -> 854x480), unless the spec gives the width; a width alone, the height from it.
    Raises ValueError when a side would pass MAX_SIDE (a 1600x16 strip at height 240)."""
    display_w, display_h = video.display_size
    if spec.height is None:  # a width alone
        assert spec.width is not None
        width, height = spec.width, max(round(display_h * spec.width / display_w / 2) * 2, 2)
    elif spec.width is None:
        width, height = max(round(display_w * spec.height / display_h / 2) * 2, 2), spec.height
    else:
        width, height = spec.width, spec.height
    if max(width, height) > MAX_SIDE:
        raise ValueError(
            f"the output would be {width}x{height} (the input shows {display_w:g}x{display_h:g}),"
            f" over {MAX_SIDE} pixels: give a smaller --height or --width"
        )
    return Geometry(
        width=width,
        height=height,
        rotation=video.rotation,
        mirrored=video.mirrored,
        deinterlace=video.interlaced,
        bit_depth=video.bit_depth,
        display_aspect=display_w / display_h,
    )


def plan_streams(spec: TranscodeSpec, source: MediaInfo) -> Plan:
    """Choose and map the streams. Raises ValueError (one line) when there is no video."""
    video = source.video
    if video is None:
        raise ValueError(source.no_video_reason())
    container = container_of(spec.output)
    copyable = AUDIO_COPYABLE[container]
    choices: list[StreamChoice] = []
    audio: list[StreamChoice] = []
    subtitles: list[StreamChoice] = []
    for stream in source.streams:
        base: dict[str, Any] = {"index": stream.index, "kind": stream.kind, "codec": stream.codec}
        if stream.index == video.index:
            choice = StreamChoice(**base, action="converted", to=spec.codec)
        elif stream.kind == "video":
            why = "cover art" if stream.attached_pic else "not the main video"
            choice = StreamChoice(**base, action="dropped", why=why)
        elif stream.kind == "audio":
            choice = _audio_choice(spec, stream, base, copyable, len(audio))
            if choice.action != "dropped":
                audio.append(choice)
        elif stream.kind == "subtitle":
            choice = _subtitle_choice(spec, stream, base, container)
            if choice.action != "dropped":
                subtitles.append(choice)
        else:
            choice = StreamChoice(**base, action="dropped", why=f"{stream.kind} stream")
        choices.append(choice)
    return Plan(
        video=video,
        geometry=geometry(spec, video),
        audio=tuple(audio),
        subtitles=tuple(subtitles),
        choices=tuple(choices),
        container=container,
    )


def _audio_choice(
    spec: TranscodeSpec,
    stream: StreamInfo,
    base: dict[str, Any],
    copyable: frozenset[str],
    kept_so_far: int,
) -> StreamChoice:
    if spec.audio == "none":
        return StreamChoice(**base, action="dropped", why="--audio none")
    if spec.audio_tracks == "first" and kept_so_far:
        return StreamChoice(**base, action="dropped", why="--audio-tracks first")
    if spec.audio == "copy" and stream.codec in copyable:
        return StreamChoice(**base, action="kept")
    why = None if spec.audio == "aac" else f"{spec.output_suffix} cannot carry {stream.codec}"
    return StreamChoice(**base, action="converted", to="aac", why=why,
                        bitrate=aac_bitrate(stream.channels))  # fmt: skip


def _subtitle_choice(
    spec: TranscodeSpec, stream: StreamInfo, base: dict[str, Any], container: str
) -> StreamChoice:
    if spec.subtitles == "drop":
        return StreamChoice(**base, action="dropped", why="--subtitles drop")
    if container == "mkv":
        if stream.codec == "mov_text":  # MP4's own text: Matroska has no codec id for it
            return StreamChoice(**base, action="converted", to="srt")
        return StreamChoice(**base, action="kept")
    if stream.codec not in TEXT_SUBTITLES:
        return StreamChoice(**base, action="dropped", why="bitmap subtitles cannot become text")
    if container == "ts":
        return StreamChoice(**base, action="dropped", why=".ts cannot carry text subtitles")
    if stream.codec == "mov_text":
        return StreamChoice(**base, action="kept")
    return StreamChoice(**base, action="converted", to="mov_text")
