"""Checking what ffmpeg wrote against what was asked, and naming why ffmpeg failed.

Validation knows media: durations are compared with the streams that were kept (not with the
container, which may hold a longer track that was dropped); codecs are compared by family (MP2
copied into MP4 reads back as `mp3`, the MPEG audio decoder's name); an input without a duration
is checked against the frames ffmpeg decoded; pictures must have square pixels and the display
aspect the plan computed (within 1%, or half a pixel of rounding to even sizes).
"""

from __future__ import annotations

import re

from gpujobs.media import MediaInfo, StreamInfo, explain
from gpujobs.specs import TranscodeSpec
from workers.transcode.plan import Plan

# Codec names one stream may carry after a round trip through a container.
_FAMILIES = {
    "mp2": "mpeg-audio", "mp3": "mpeg-audio", "mp1": "mpeg-audio",
    "mp2float": "mpeg-audio", "mp3float": "mpeg-audio",
    "aac": "aac", "aac_latm": "aac", "aac_fixed": "aac",
    "ac3": "ac3", "ac3_fixed": "ac3",
    "mov_text": "text", "subrip": "text", "srt": "text", "ass": "text", "ssa": "text",
}  # fmt: skip
ASPECT_TOLERANCE = 0.01

# ffmpeg's lines that only say that something failed, not what; never the reason.
_GENERIC = re.compile(
    r"Conversion failed|Error opening output file|Error initializing output stream|"
    r"Nothing was written|Task finished with error|Terminating thread|Error while filtering|"
    r"Could not open encoder before EOF|Error sending frames to consumers|"
    r"Error while opening encoder|Exiting normally|received signal|Error closing|"
    r"Error opening output files|Error writing trailer|Error submitting",
    re.IGNORECASE,
)
_LEVEL = re.compile(r"\[(fatal|error)\] ")
_CONTEXT = re.compile(r"^(\[[^\]]+ @ 0x[0-9a-f]+\] )+|^\[(out|in)#\d+[^\]]*\] ")


def family(codec: str | None) -> str | None:
    if codec is None:
        return None
    if codec.startswith("pcm_"):
        return "pcm"
    return _FAMILIES.get(codec, codec)


def duration_tolerance_s(duration_s: float) -> float:
    """1% of the input's duration, at least 0.1 s (a few frames) for clips of seconds."""
    return max(0.01 * duration_s, 0.1)


def expected_duration(source: MediaInfo, plan: Plan) -> float | None:
    """How long the output should last: the longest stream kept (None: the input says not)."""
    return source.duration_of(kept_streams(source, plan))


def kept_streams(source: MediaInfo, plan: Plan) -> list[StreamInfo]:
    """The input's streams the plan keeps, in the input's order."""
    return [s for s in source.streams if s.index in plan.kept_streams]


def validate_output(
    result: MediaInfo,
    source: MediaInfo,
    spec: TranscodeSpec,
    plan: Plan,
    decoded_frames: int | None = None,
) -> str | None:
    """None when the output is what the plan asked for, else one line saying what is wrong.

    decoded_frames: frames ffmpeg reported writing, checked against the output when the input's
    video has no duration of its own to compare with.
    """
    video = result.video
    if video is None:
        return "output has no video stream"
    if video.codec != spec.codec:
        return f"output video codec is {video.codec}, expected {spec.codec}"
    g = plan.geometry
    if (video.width, video.height) != (g.width, g.height):
        return f"output is {video.width}x{video.height}, expected {g.width}x{g.height}"
    if video.sar != 1:
        return f"output pixels are not square (SAR {video.sar})"
    if video.rotation:
        return f"output still carries a {video.rotation} degree rotation"
    if (spec.width is None or spec.height is None) and g.display_aspect:
        aspect = video.width / video.height
        # Even sizes round the width by up to one pixel; allow that on small outputs.
        allowed = max(ASPECT_TOLERANCE, 1.0 / video.width)
        if abs(aspect / g.display_aspect - 1) > allowed:
            return (f"output display aspect {aspect:.4f} differs from the input's "
                    f"{g.display_aspect:.4f} by more than 1%")  # fmt: skip
    kept = kept_streams(source, plan)
    expected = source.duration_of(kept)
    if expected is not None:
        # The whole output against the streams kept: exactly where each says how long it
        # lasts, else the container's duration bounds it from above only (a Matroska track
        # without a DURATION tag lasts at most as long as its segment).
        actual = result.duration_of(list(result.streams))
        exact = all(s.duration_s is not None for s in kept)
        tolerance = duration_tolerance_s(expected)
        if actual is not None and exact and abs(actual - expected) > tolerance:
            return (f"output lasts {actual:.2f} s, the streams kept last {expected:.2f} s "
                    f"(tolerance {tolerance:.2f} s)")  # fmt: skip
        if actual is not None and not exact and actual - expected > tolerance:
            return f"output lasts {actual:.2f} s, longer than the input's {expected:.2f} s"
    elif not result.duration_of(list(result.streams)):
        return "output has no duration"
    wanted = plan.video.duration_s
    if wanted is not None:  # the picture against its own source
        lasts = result.duration_of([video])
        tolerance = duration_tolerance_s(wanted)
        frames = plan.video.frames or video.frames
        if frames:
            # A header's length counts from decoding timestamps (MP4's): it ends up to the
            # reorder delay (2 frames with x264's defaults) plus the last frame's guessed
            # duration short of the last picture's end; where the rate varies those are the
            # slow end's frames. Allow three average frames.
            tolerance += 3 * wanted / frames
        if lasts is not None and abs(lasts - wanted) > tolerance:
            return (f"video lasts {lasts:.2f} s, the input's video lasts {wanted:.2f} s "
                    f"(tolerance {tolerance:.2f} s)")  # fmt: skip
    elif decoded_frames is not None and video.frames is not None and video.frames != decoded_frames:
        # No length of its own to compare with: every frame ffmpeg wrote is in the file.
        return f"output holds {video.frames} frames, ffmpeg wrote {decoded_frames}"
    audio = result.audio
    if len(audio) != len(plan.audio):
        return f"output has {len(audio)} audio tracks, expected {len(plan.audio)}"
    for n, (choice, got) in enumerate(zip(plan.audio, audio, strict=True)):
        want = choice.codec if choice.action == "kept" else choice.to
        if family(got.codec) != family(want):
            return f"output audio track {n} is {got.codec}, expected {want}"
    subtitles = result.of_kind("subtitle")
    if len(subtitles) != len(plan.subtitles):
        return f"output has {len(subtitles)} subtitle tracks, expected {len(plan.subtitles)}"
    return None


def failure_reason(log: list[str], returncode: int | None) -> str:
    """The line of ffmpeg's log that names the cause of a failure (the first error that is not
    a generic "Conversion failed!"), explained in words where we know better ones; else the
    last lines. Works on logs written with `-loglevel level+info`."""
    errors = [line for line in log if _LEVEL.search(line)]
    for line in errors:
        message = _clean(line)
        if message and not _GENERIC.search(message):
            return explain(message)
    if errors:
        return explain(_clean(errors[0]))
    tail = " | ".join(_clean(line) for line in log[-3:]) or "no output"
    return f"ffmpeg exited with {returncode}: {tail}"


def _clean(line: str) -> str:
    """A log line without its level tag and the `[mp4 @ 0x...]` context prefix."""
    text = _LEVEL.sub("", line, count=1)
    text = re.sub(r"\[(info|warning|verbose|debug)\] ", "", text)
    return _CONTEXT.sub("", text).strip()
