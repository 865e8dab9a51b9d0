"""What a media file holds, read as data with PyAV (libavformat), never by parsing `ffmpeg -i`.

One model, `MediaInfo`, serves both sides: the producer's check at submit (`check_input`: is
there a real video stream, is the file complete) and the worker's probe before and after an
encode (`probe`). PyAV is imported on first use only, so `import gpujobs` stays light.

Units: seconds for durations, pixels for sizes, degrees clockwise for rotation (the turn a
player applies to show the picture upright), frames per second for rates.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from gpujobs.containers import (
    SNIFF_BYTES,
    iso_truncation,
    looks_like_video,
    matroska_truncation,
    sniffed_demuxer,
)

# libavcodec's AVFieldOrder, as PyAV returns it (codec_context.field_order).
_FIELD_ORDERS = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}
INTERLACED_ORDERS = frozenset({"tt", "bb", "tb", "bt"})
# Subtitle codecs that are text (can become mov_text); the others are bitmaps.
TEXT_SUBTITLES = frozenset({"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"})
# What ffmpeg's log says, and what it means to a user.
_EXPLAINED = {
    "moov atom not found": "the file is incomplete (no moov atom)",
}

# A quick header read (see probe): the smallest probe libavformat allows, no analysis window.
_QUICK = {"probesize": "32", "analyzeduration": "1"}
NOT_VIDEO = "not a video file (unrecognised container)"
STILL_IMAGE = "not a video file (a still image)"
COVER_ONLY = "no video stream (audio with cover art)"
# Codecs of single pictures as well as of motion video (MJPEG cameras): one of these with one
# picture in the whole stream is a still, or an audio file's cover.
PICTURE_CODECS = frozenset({"mjpeg", "png", "bmp", "tiff", "webp", "gif", "jpeg2000", "qoi"})
# libavformat's demuxers that show text files as video (ANSI art: tty takes .txt, .nfo...).
_TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
VERDICTS_KEPT = 4096
_FLAGS: dict[Any, tuple[tuple[str, int], ...]] = {}  # _disposition_flags' memory
_VERDICTS: dict[tuple[int, ...], str | None] = {}  # input_verdict's memory, oldest first
_VERDICTS_LOCK = threading.Lock()

StreamKind = Literal["video", "audio", "subtitle", "data", "attachment", "unknown"]


class ProbeError(Exception):
    """The file is not media we can read; the message says why in one line."""


@dataclass(frozen=True)
class StreamInfo:
    """One stream of a container.

    index: its index in the container (`-map 0:<index>`); kind_index: its index among streams of
    its kind (`-map 0:v:<kind_index>`). codec: libavcodec's name (h264, aac, pcm_s16le...).
    dispositions: names such as "default", "attached_pic". duration_s, frames: None when the
    container does not say. Video: width/height as coded, sar (sample aspect ratio, 1 when
    unknown), rotation (0, 90, 180 or 270, clockwise), mirrored (the display matrix also
    flips the picture left to right, before the turn, as some front cameras write it),
    field_order (progressive, tt, bb, tb, bt or unknown), pix_fmt, bit_depth, fps. Audio:
    channels, layout, sample_rate, language.
    """

    index: int
    kind: StreamKind
    kind_index: int
    codec: str
    dispositions: frozenset[str] = frozenset()
    duration_s: float | None = None
    frames: int | None = None
    width: int = 0
    height: int = 0
    sar: Fraction = Fraction(1)
    rotation: int = 0
    mirrored: bool = False
    field_order: str = "unknown"
    pix_fmt: str | None = None
    bit_depth: int = 8
    profile: str | None = None
    fps: float | None = None
    channels: int = 0
    layout: str | None = None
    sample_rate: int = 0
    language: str | None = None

    @property
    def attached_pic(self) -> bool:
        """A cover picture stored as a video stream (one frame, not a video)."""
        return "attached_pic" in self.dispositions

    @property
    def real_video(self) -> bool:
        """A video stream that moves: not cover art, not a still or a one-frame thumbnail."""
        return (
            self.kind == "video"
            and not self.attached_pic
            and not {"still_image", "timed_thumbnails"} & self.dispositions
            and self.frames != 1
            and self.width > 0
        )

    @property
    def interlaced(self) -> bool:
        return self.field_order in INTERLACED_ORDERS

    @property
    def display_size(self) -> tuple[float, float]:
        """Width and height as shown: SAR applied, then the rotation (90/270 swap them)."""
        width = self.width * float(self.sar) if self.sar > 0 else float(self.width)
        height = float(self.height)
        return (height, width) if self.rotation in (90, 270) else (width, height)

    @property
    def display_aspect(self) -> float:
        width, height = self.display_size
        return width / height if height else 0.0


@dataclass(frozen=True)
class MediaInfo:
    """A probed file: its container format, duration (None when unknown, as in raw .h264
    streams), size in bytes and its streams in container order."""

    format: str
    duration_s: float | None
    size_bytes: int
    streams: tuple[StreamInfo, ...] = field(default_factory=tuple)

    def of_kind(self, kind: StreamKind) -> list[StreamInfo]:
        return [s for s in self.streams if s.kind == kind]

    @property
    def video(self) -> StreamInfo | None:
        """The main video: the default real video stream, else the largest (None if none)."""
        real = [s for s in self.streams if s.real_video]
        if not real:
            return None
        return max(real, key=lambda s: ("default" in s.dispositions, s.width * s.height))

    @property
    def audio(self) -> list[StreamInfo]:
        return self.of_kind("audio")

    @property
    def has_audio(self) -> bool:
        return bool(self.audio)

    # The main video's facts, for callers that want one line (None/0 without video).
    @property
    def video_codec(self) -> str | None:
        return self.video.codec if self.video else None

    @property
    def width(self) -> int:
        return self.video.width if self.video else 0

    @property
    def height(self) -> int:
        return self.video.height if self.video else 0

    @property
    def fps(self) -> float | None:
        return self.video.fps if self.video else None

    @property
    def audio_codec(self) -> str | None:
        """The first audio track's codec."""
        return self.audio[0].codec if self.audio else None

    def duration_of(self, streams: list[StreamInfo]) -> float | None:
        """How long `streams` last: the longest of their own durations; the container's for a
        stream that has none (an upper bound, not its length: see StreamInfo.duration_s);
        None when nothing says."""
        durations = [s.duration_s if s.duration_s is not None else self.duration_s
                     for s in streams]  # fmt: skip
        known = [d for d in durations if d is not None]
        return max(known) if known else None

    def no_video_reason(self) -> str:
        """Why there is no video to transcode, in words."""
        if any(s.attached_pic for s in self.streams):
            return COVER_ONLY
        if self.has_audio:
            return "no video stream (audio only)"
        return "no video stream"


def explain(message: str) -> str:
    """ffmpeg's message in words a user knows ("moov atom not found" -> the file is incomplete)."""
    text = message.strip()
    for needle, words in _EXPLAINED.items():
        if needle in text:
            return f"{words}: {text}" if text != needle else words
    return text


def probe(
    path: Path, first_frame: bool = True, quick: bool = False, format: str | None = None
) -> MediaInfo:
    """Read every stream of `path` with PyAV.

    first_frame: also decode the main video's first frame, which is where libavcodec reports
    the display matrix (rotation) and whether pictures are interlaced (a few milliseconds).
    quick: read only what the container's header says (libavformat's probesize and
    analyzeduration at their minimum: no frames decoded to fill in what it leaves out, such as
    the pixel format); enough to see a video stream and its size where the header holds them
    (MP4, MOV, Matroska), not always where streams are found by reading packets (MPEG-TS,
    raw streams): `check_input` then reads the file in full.
    format: the demuxer to read it with (libavformat's name: "mp4", "matroska"), for a file
    whose container is known (one gpujobs wrote), skipping libavformat's guess (about 0.3 ms);
    None: guessed from the file's first bytes.
    Raises ProbeError with ffmpeg's own reason (explained, see `explain`) when it cannot read it.
    """
    import av  # a 35 MB library: loaded by the commands that probe, never by `import gpujobs`

    options: dict[str, Any] = {"format": format, "metadata_errors": "ignore",
                               "container_options": _QUICK if quick else None}  # fmt: skip
    try:
        container = av.open(str(path), **options)
    except av.FFmpegError as exc:
        raise ProbeError(_open_failure(path, options, exc)) from None
    with container:
        streams = [_stream_info(s, n) for s, n in zip(container.streams, _kind_indexes(container),
                                                      strict=True)]  # fmt: skip
        info = MediaInfo(
            format=container.format.name,
            duration_s=container.duration / 1_000_000 if container.duration else None,
            size_bytes=path.stat().st_size,
            streams=tuple(streams),
        )
        main = info.video
        if first_frame and main is not None:
            rotation, mirrored, interlaced = _first_frame_facts(container, main.index)
            order = main.field_order
            if interlaced and order not in INTERLACED_ORDERS:
                order = "tt"  # flagged per frame only; the deinterlacer detects the parity
            updated = replace(main, rotation=rotation, mirrored=mirrored, field_order=order)
            info = MediaInfo(
                format=info.format,
                duration_s=info.duration_s,
                size_bytes=info.size_bytes,
                streams=tuple(updated if s.index == main.index else s for s in streams),
            )
    return info


def check_input(path: Path, demuxer: str | None = None) -> MediaInfo:
    """The producer's check at submit: the file is complete and has a real video stream.

    A quick read of the header first (see `probe`), with `demuxer` when the file's first bytes
    name it (see `sniffed_demuxer`); only when that finds no real video is the file read in
    full, its container guessed, so a refusal is always the full probe's verdict.
    Raises ProbeError with one line: "the file is incomplete (...)", COVER_ONLY (a picture
    flagged as cover art, or the only video is one picture beside audio: an MP3's cover
    remuxed into Matroska), or ffmpeg's reason for not reading it.
    """
    truncated = iso_truncation(path) or matroska_truncation(path)
    if truncated:
        raise ProbeError(truncated)
    try:
        info = probe(path, first_frame=False, quick=True, format=demuxer)
    except ProbeError:
        info = None
    if info is None or info.video is None:
        info = probe(path, first_frame=False)
    if info.video is None:
        raise ProbeError(info.no_video_reason())
    if info.video.codec in PICTURE_CODECS and _pictures(path, info.video.index, most=2) < 2:
        # One picture not flagged as cover art (an MP3's cover remuxed into Matroska).
        raise ProbeError(COVER_ONLY if info.has_audio else STILL_IMAGE)
    return info


def check_guessed(path: Path) -> MediaInfo:
    """The check at submit for a file whose first bytes name no container `looks_like_video`
    knows: libavformat guesses the container from the whole probe, as ffmpeg will.
    Raises ProbeError with one line: NOT_VIDEO when libavformat reads no media from it or
    reads text as video (its ANSI-art demuxers, which take any .txt); "not a video file (a
    still image)" when its only video is one picture (a PNG, a JPEG: libavformat reads those
    as one-frame video; a raw MJPEG stream or an animated GIF has more); else `check_input`'s
    reasons ("no video stream (audio with cover art)" for an MP3 with its cover).
    """
    try:
        info = probe(path, first_frame=False)
    except ProbeError:
        raise ProbeError(NOT_VIDEO) from None
    if info.format in _TEXT_DEMUXERS:
        raise ProbeError(NOT_VIDEO)
    if info.video is None:
        raise ProbeError(info.no_video_reason())
    if _pictures(path, info.video.index, most=2) < 2:
        raise ProbeError(STILL_IMAGE)
    return info


def _pictures(path: Path, index: int, most: int) -> int:
    """How many pictures stream `index` of `path` holds, counted up to `most` (demuxed only)."""
    import av

    count = 0
    with av.open(str(path), metadata_errors="ignore") as container:
        for packet in container.demux(container.streams[index]):
            count += packet.size > 0
            if count >= most:
                break
    return count


def file_version(info: os.stat_result) -> tuple[int, ...]:
    """A file's identity and change stamps, from its stat: device, inode, size, modification
    and change times in ns. Any write, a rename over it or a copy in its place changes one
    (the change time cannot be set back by a user), so facts kept by it are never stale."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def input_verdict(path: str | Path, info: os.stat_result) -> str | None:
    """Why `path` is no input to transcode, in one line, or None when it is one: `check_input`'s
    reason for a file whose first bytes name a video container we know (`looks_like_video`),
    `check_guessed`'s for any other (libavformat's guess decides: MXF, DV, AVCHD, GIF...).

    info: the file's stat (following symlinks). Remembered for this process by the file's
    identity (device, inode, size, modification and change times in ns; up to VERDICTS_KEPT
    files), so the same unchanged file submitted again (a ladder, many renditions, a retry) is
    not read again; a file written since is read afresh. OSError (unreadable) is raised and
    not remembered.
    """
    key = file_version(info)
    if key in _VERDICTS:
        return _VERDICTS[key]
    verdict: str | None = None
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    try:
        if looks_like_video(head):
            check_input(Path(path), sniffed_demuxer(head))
        else:
            check_guessed(Path(path))
    except ProbeError as exc:
        verdict = str(exc)
    with _VERDICTS_LOCK:
        if len(_VERDICTS) >= VERDICTS_KEPT:
            del _VERDICTS[next(iter(_VERDICTS))]  # the oldest
        _VERDICTS[key] = verdict
    return verdict


def read_verdicts(files: Iterable[Path], threads: int | None = None) -> None:
    """Work out `input_verdict` for many files at once, ahead of the submits that ask for it,
    `threads` at a time (default: one per CPU, at least 2 and at most 8). libavformat reads a
    header without Python's lock, so on N cores N files are read together (and a slow network
    mount waits on several at once): a bulk submit of new files is bound by these reads (0.5
    to 1 ms a file here; 2 threads on 2 cores: 1.6x, docs/benchmarks.md). Each file is read once
    however often it is named; files that cannot be stat'ed or read, and all but regular
    non-empty files, are skipped: the submit's own check reports them."""
    todo: dict[tuple[int, ...], tuple[Path, os.stat_result]] = {}
    for path in dict.fromkeys(files):  # a bulk submit of one input: one stat, not one a job
        try:
            info = path.stat()
        except OSError:
            continue
        key = file_version(info)
        if stat.S_ISREG(info.st_mode) and info.st_size and key not in _VERDICTS:
            todo.setdefault(key, (path, info))
    workers = min(threads or max(2, os.cpu_count() or 1), 8, len(todo))
    if workers <= 1:
        return  # nothing to overlap: each submit reads its file as it comes

    def read(item: tuple[Path, os.stat_result]) -> None:
        with suppress(OSError):
            input_verdict(*item)

    with ThreadPoolExecutor(workers, thread_name_prefix="gpujobs-probe") as pool:
        for _ in pool.map(read, todo.values()):
            pass


class _ErrorsLogged:
    """libav's log level at ERROR while any thread is inside (`with _errors_logged:`); the
    level from before the first one entered is restored when the last one leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: int | None = None

    def __enter__(self) -> None:
        import av.logging

        with self._lock:
            if self._inside == 0:
                self._saved = av.logging.get_level()
                av.logging.set_level(av.logging.ERROR)
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        import av.logging

        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                av.logging.set_level(self._saved)


_errors_logged = _ErrorsLogged()


def _open_failure(path: Path, options: dict[str, Any], exc: Exception) -> str:
    """Why `path` does not open, in ffmpeg's words: it is opened again with libav's log on,
    and the first line logged is the reason ("moov atom not found"). The log stays off for
    files that open: its callback takes Python's lock for every line, which kept threads
    from reading headers at once (`read_verdicts`)."""
    import av
    import av.logging

    try:
        # Capture keeps this thread's lines only.
        with _errors_logged, av.logging.Capture() as logs:
            av.open(str(path), **options).close()
    except av.FFmpegError as again:
        return _av_reason(again, logs)
    return _av_reason(exc, [])  # it opens now: the file changed in between


def _av_reason(exc: Any, logs: list[tuple[int, str, str]]) -> str:
    """PyAV's error, or better the first line ffmpeg logged for it ("moov atom not found")."""
    for _level, _name, message in logs:
        if message.strip():
            return explain(message)
    return explain(str(getattr(exc, "strerror", None) or exc))


def _kind_indexes(container: Any) -> list[int]:
    counts: dict[str, int] = {}
    out = []
    for stream in container.streams:
        out.append(counts.get(stream.type, 0))
        counts[stream.type] = out[-1] + 1
    return out


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if not value or time_base is None:
        return None
    return float(value * time_base)


def _tagged(metadata: dict[str, str]) -> float | None:
    """A stream's duration from its DURATION tag ("01:02:03.040000000"), None without one.
    Matroska keeps no duration per track, only the segment's; ffmpeg and mkvmerge write this
    tag for each track (mkvmerge's statistics tags, maybe with a language: DURATION-eng)."""
    for key, value in metadata.items():
        if key.upper().startswith("DURATION"):
            hours, _, rest = value.strip().partition(":")
            minutes, _, seconds = rest.partition(":")
            try:
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds) or None
            except ValueError:
                return None
    return None


def _disposition_flags(kind: Any) -> tuple[tuple[str, int], ...]:
    """(name, bit) of each of PyAV's Disposition flags, read once (enum lookups are slow)."""
    found = _FLAGS.get(kind)
    if found is None:
        found = _FLAGS[kind] = tuple(
            (name, int(flag)) for name, flag in kind.__members__.items() if flag
        )
    return found


def _stream_info(stream: Any, kind_index: int) -> StreamInfo:
    kind = (
        stream.type
        if stream.type in ("video", "audio", "subtitle", "data", "attachment")
        else ("unknown")
    )
    ctx = stream.codec_context
    # The codec's canonical name (the codec id's: "mp3", not the decoder's "mp3float").
    codec = "none"
    if ctx is not None:
        codec = getattr(ctx.codec, "canonical_name", None) or ctx.name or "none"
    flags, flag_type = int(stream.disposition), type(stream.disposition)
    dispositions = frozenset(name for name, flag in _disposition_flags(flag_type) if flags & flag)
    common: dict[str, Any] = {
        "index": stream.index,
        "kind": kind,
        "kind_index": kind_index,
        "codec": codec,
        "dispositions": dispositions,
        "duration_s": _seconds(stream.duration, stream.time_base) or _tagged(stream.metadata),
        "frames": stream.frames or None,
        "language": stream.metadata.get("language"),
    }
    if kind == "video":
        # ffmpeg's own rule (av_guess_sample_aspect_ratio, which PyAV's stream gives): the
        # container's aspect (MP4's pasp box, Matroska's display size; what `-aspect`, mkvmerge
        # and MP4Box set) before the bitstream's.
        sar = stream.sample_aspect_ratio or ctx.sample_aspect_ratio
        rate = stream.average_rate or stream.guessed_rate
        fmt = ctx.format
        depth = max((c.bits for c in fmt.components), default=8) if fmt is not None else 8
        return StreamInfo(
            **common,
            width=ctx.width,
            height=ctx.height,
            sar=Fraction(sar) if sar and sar > 0 else Fraction(1),
            field_order=_FIELD_ORDERS.get(int(ctx.field_order or 0), "unknown"),
            pix_fmt=ctx.pix_fmt,
            bit_depth=depth,
            profile=ctx.profile,
            fps=float(rate) if rate else None,
        )
    if kind == "audio":
        return StreamInfo(
            **common,
            channels=ctx.channels,
            layout=ctx.layout.name if ctx.layout is not None else None,
            sample_rate=ctx.sample_rate,
        )
    return StreamInfo(**common)


def _first_frame_facts(container: Any, index: int) -> tuple[int, bool, bool]:
    """(rotation clockwise in degrees, mirrored, interlaced) of the first decodable frame of
    stream `index`; (0, False, False) when none decodes (the encode will say why)."""
    import av
    from av.sidedata.sidedata import Type

    stream = container.streams[index]
    stream.thread_type = "NONE"
    try:
        for frame in container.decode(stream):
            # PyAV gives the display matrix's angle counter-clockwise; players turn clockwise.
            rotation = round(-float(frame.rotation) / 90) * 90 % 360
            matrix = frame.side_data.get(Type.DISPLAYMATRIX)
            mirrored = matrix is not None and _mirrors(bytes(matrix))
            if mirrored:  # the angle read assumes a top-bottom flip; ours is left-right
                rotation = (rotation + 180) % 360
            return rotation, mirrored, bool(frame.interlaced_frame)
    except av.FFmpegError:
        pass
    return 0, False, False


def _mirrors(matrix: bytes) -> bool:
    """Whether a display matrix (libavutil's: nine int32, row by row, a b u / c d v / x y w)
    flips the picture as well as turning it: its 2x2 part's determinant ad - bc is negative.
    The angle PyAV reads from it (av_display_rotation_get) does not say so."""
    a, b, _, c, d = struct.unpack_from("<5i", matrix)
    return bool(a * d - b * c < 0)
