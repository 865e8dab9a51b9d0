"""Run every file of a folder through the transcode queue and print what came out, as a
Markdown table: result (or the one-line refusal), output size, SAR, duration and tracks.

    .venv/bin/python scripts/field_check.py DIR [--broker URL] [--audio-none GLOB] [-- OPTIONS]

Without --broker (and GPUJOBS_BROKER_URL), an embedded stack (Valkey and one worker) is started
in a temporary state folder and stopped at the end; with a broker, its workers must share the
media root (GPUJOBS_MEDIA_ROOT). Inputs are copied into the media root's inbox first. Files
matching --audio-none (default `audio-longer*`, as shared/field/README.md asks) are sent with
`audio="none"`. Made for `shared/field/make-inputs.sh DIR`; see docs/field.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gpujobs import local
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.errors import GpujobsError
from gpujobs.media import MediaInfo, probe
from gpujobs.specs import JobState


def tracks(info: MediaInfo) -> str:
    """ "v:h264 a:aac,ac3 s:mov_text" for the output's streams."""
    parts = []
    for kind, letter in (("video", "v"), ("audio", "a"), ("subtitle", "s")):
        codecs = [s.codec for s in info.of_kind(kind)]  # type: ignore[arg-type]
        if codecs:
            parts.append(f"{letter}:{','.join(codecs)}")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--broker", help="broker URL (default: an embedded stack)")
    parser.add_argument("--audio-none", default="audio-longer*", metavar="GLOB")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    options = parser.parse_args()
    files = sorted(p for p in options.folder.iterdir() if p.is_file() and p.suffix != ".sh")
    if not files:
        print(f"error: no files in {options.folder}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpujobs-field-"))
    if options.broker:
        os.environ["GPUJOBS_BROKER_URL"] = options.broker
    embedded = not os.environ.get("GPUJOBS_BROKER_URL")
    if embedded:
        os.environ["GPUJOBS_STATE_DIR"] = str(work / "state")
        os.environ["GPUJOBS_MEDIA_ROOT"] = str(work / "media")
    settings = Settings()
    client = Client(settings)  # starts the embedded stack when no broker is configured
    ffmpeg = settings.ffmpeg_binary()
    print(f"ffmpeg: {ffmpeg}\n")
    print("| file | result | size | SAR | duration | tracks |")
    print("|---|---|---|---|---|---|")
    wrong = 0
    try:
        for path in files:
            audio = "none" if fnmatch.fnmatch(path.name, options.audio_none) else None
            shown = path.name + (" (--audio none)" if audio else "")
            output = settings.media / "field-out" / f"{path.stem}.480p.mp4"
            try:
                job = client.submit_transcode(
                    path,
                    output,
                    audio=audio,
                    copy_outside=True,
                    overwrite=True,  # type: ignore[arg-type]
                )
            except GpujobsError as exc:
                print(f"| {shown} | refused: {exc} | | | | |".replace(str(path), path.name))
                continue
            record = job.wait(timeout=options.timeout)
            if record.state is not JobState.SUCCEEDED:
                wrong += 1
                print(f"| {shown} | {record.state.value}: {record.error} | | | | |")
                continue
            info = probe(output)
            assert info.video is not None
            duration = info.duration_of(list(info.streams)) or 0.0
            print(f"| {shown} | succeeded | {info.video.width}x{info.video.height} | "
                  f"{info.video.sar} | {duration:.2f} s | {tracks(info)} |")  # fmt: skip
    finally:
        if embedded:
            local.stop(settings)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
