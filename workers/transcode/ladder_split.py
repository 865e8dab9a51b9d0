"""A split ladder: the ladder per piece, then one stream-copy pass that packages the whole.

Of the two orders (pieces first and then the ladder, or the ladder per piece), this is the one
that keeps the work parallel: each piece's worker decodes its frames once and encodes every
rendition of them (a ladder job with package "mp4", so one MP4 per rendition; its keyframes at
every segment boundary from the piece's start, in every rendition alike, and on its first
frame). The join then concatenates each rendition's pieces with the concat demuxer and hands
them, stream-copied, with the source's audio (encoded once), to the HLS or DASH muxer: segments
start on keyframes that are the same in every rendition. A segment that spans a cut can be up
to one segment longer than the others (the HLS target duration says so); nothing is encoded
twice.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import av

from gpujobs import keys
from gpujobs.ladder import ENTRY_FILES, LadderSpec
from gpujobs.specs import JobRecord, JobState, TranscodeSpec
from workers.runtime import PathOutsideMediaRoot
from workers.transcode import command as tc
from workers.transcode import ladder
from workers.transcode.split import SplitAttempt, read_facts, work_dir


def join_command(
    ffmpeg: str,
    spec: LadderSpec,
    lists: list[Path],
    source: Path,
    folder: Path,
    renditions: list[ladder.Rendition],
    audio: bool,
    copy_audio: bool = False,
) -> list[str]:
    """Package the joined renditions (one concat list each, video copied) and the source's
    audio (copied when it is AAC, else encoded) into `folder`."""
    args = [ffmpeg]
    for concat_list in lists:
        args += ["-f", "concat", "-safe", "0", "-i", str(concat_list)]
    args += ["-i", str(source)]
    audio_input = len(lists)
    if spec.package == "mp4":
        for i, r in enumerate(renditions):
            args += ["-map", f"{i}:v:0", *(["-map", f"{audio_input}:a:0"] if audio else [])]
            args += ["-c:v", "copy", *(ladder.audio_args(copy_audio) if audio else ["-an"])]
            args += ["-y", str(folder / f"{r.name}.mp4")]
        return args
    for i in range(len(renditions)):
        args += ["-map", f"{i}:v:0"]
    audio_maps = ladder.audio_streams(spec, renditions) if audio else 0
    for _ in range(audio_maps):
        args += ["-map", f"{audio_input}:a:0"]
    args += ["-c:v", "copy", *(ladder.audio_args(copy_audio) if audio_maps else [])]
    return args + ladder.package_args(spec, folder, renditions, audio)


class LadderSplitAttempt(SplitAttempt):
    """One attempt of a split ladder's parent: plan (as any split job), or join and package."""

    def parse(self, spec: dict[str, Any]) -> TranscodeSpec | LadderSpec:
        return LadderSpec.model_validate(spec)

    def piece_values(
        self, index: int, piece_input: str, work: Path, output: Path
    ) -> dict[str, Any]:
        """Piece `index`: the ladder of its cut piece, one MP4 per rendition, no audio."""
        assert isinstance(self.whole, LadderSpec)
        media = self.rt.settings.media.resolve()
        folder = (work / f"piece{index:03d}").relative_to(media).as_posix()
        values = self.whole.model_dump(mode="json", exclude={"split"})
        return {**values, "input": piece_input, "output": folder, "package": "mp4", "audio": "none"}

    def join_pieces(self, record: JobRecord, pieces: list[JobRecord]) -> dict[str, Any]:
        rt, spec = self.rt, self.whole
        assert isinstance(spec, LadderSpec)
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        source = read_facts(source_path)
        video = ladder.read_video(source_path)
        renditions = ladder.plan_renditions(spec.renditions, video)
        work = work_dir(output_path, self.job_id)
        folders = [rt.media_path(str(p.spec["output"])) for p in pieces]
        lists = []
        for r in renditions:
            concat_list = work / f"{r.name}.ffconcat"
            lines = ["ffconcat version 1.0"]
            lines += [
                f"file '{folder.relative_to(work).as_posix()}/{r.name}.mp4'" for folder in folders
            ]
            concat_list.write_text("\n".join(lines) + "\n")
            lists.append(concat_list)
        for stale in output_path.parent.glob(f".{output_path.name}.{self.job_id}.*.part"):
            shutil.rmtree(stale, ignore_errors=True)
        temp = output_path.with_name(f".{output_path.name}.{self.job_id}.{self.attempt}.part")
        temp.mkdir()
        audio = source.audio_end_s is not None and spec.audio == "aac"
        command = join_command(
            rt.ffmpeg, spec, lists, source_path, temp, renditions, audio,
            copy_audio=source.audio_codec == "aac",
        )  # fmt: skip
        began = time.monotonic()
        try:
            outcome = tc.run_ffmpeg(command, lambda _: None, self.should_stop)
            if outcome.stopped:
                return self.stopped()
            if outcome.returncode != 0:
                tail = " | ".join(outcome.stderr_tail[-3:]) or "no output"
                return self.fail(f"packaging the pieces failed: ffmpeg exited with "
                                 f"{outcome.returncode}: {tail}")  # fmt: skip
            try:
                keyframes = ladder.check_ladder(temp, spec, renditions, source)
            except ladder.LadderInvalid as exc:
                return self.fail(f"ladder failed validation: {exc}")
            if self.should_stop():
                return self.stopped()
            ladder.replace_folder(temp, output_path, f"{self.job_id}.{self.attempt}")
        except (av.FFmpegError, OSError) as exc:
            return self.fail(f"packaging the pieces failed: {exc}")
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        summary = {
            "output": spec.output,
            "entry": f"{spec.output}/{ENTRY_FILES[spec.package]}".rstrip("/"),
            "package": spec.package,
            "pieces": len(pieces),
            "renditions": [r.name for r in renditions],
            "skipped_heights": [h for h in spec.renditions if h > ladder.shown_height(video)],
            "segment_s": spec.segment_s,
            "keyframes": len(keyframes),
            "frames": source.frames,
            "encode_path": "split",
            "piece_elapsed_s": [(p.result or {}).get("elapsed_s") for p in pieces],
            "join_elapsed_s": round(time.monotonic() - began, 3),
            "elapsed_s": round(time.time() - record.created_at, 3),
        }
        if self.update(state=JobState.SUCCEEDED, percent=100.0, eta_s=0, fps=None, speed=None,
                       output=spec.output, result=summary):  # fmt: skip
            self.history("succeeded")
            shutil.rmtree(work, ignore_errors=True)
            self.store.redis.delete(keys.split_done(self.job_id))
        return {**summary, "joined": True}
