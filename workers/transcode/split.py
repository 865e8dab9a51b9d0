"""Split transcodes: one long video cut at keyframes into N pieces that N workers encode at once,
then joined into one output that plays like a single-pass encode.

The parent job's deliveries, in turn (each one an attempt holding the parent's lease):
  plan   read the keyframe times (PyAV, no decode), pick N - 1 of them as cut points, cut the
         video stream there without re-encoding (ffmpeg's segment muxer, video only), and queue
         one piece job per segment on the transcode queue. Pieces are ordinary transcode jobs
         (own lease, progress, retries; a dead worker's piece is requeued alone by the watchdog)
         whose record names the parent; the parent lists them in `pieces`.
  join   sent by the piece whose success completes the set: join the encoded pieces with the
         concat demuxer (no re-encode), mux the source's audio in once (copied or encoded once,
         so no gap or click at a join), validate the whole against the source, rename into place.
The parent is fenced like any job: whatever deliveries race, it succeeds once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import redis
from celery import Celery

from gpujobs import keys
from gpujobs.app import (
    TRANSCODE_QUEUE,
    TRANSCODE_TASK,
    broker_priority,
    shared_transcode_queue,
    task_argsrepr,
)
from gpujobs.config import AudioMode
from gpujobs.ladder import LadderSpec
from gpujobs.media import ProbeError, probe
from gpujobs.specs import MAX_SPLIT, JobKind, JobRecord, JobState, TranscodeSpec
from gpujobs.store import JobStore
from workers.lease import LeaseKeeper
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime
from workers.transcode import command as tc
from workers.transcode.job import TranscodeAttempt
from workers.transcode.plan import Plan, plan_streams
from workers.transcode.split_progress import cancel_pieces, fail_parent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamFacts:
    """What the split needs to know of a file, read from its packets (no decode).

    frames: video packets; video_end_s: end of the last frame (pts + duration), seconds;
    frame_s: one frame's duration (1 / average frame rate); keyframes: their times, seconds;
    monotonic: video decode timestamps strictly increase; audio_end_s: end of the last audio
    packet (None without audio); audio_gaps: audio packets that do not start where the one
    before ended; width, height: the coded video size, pixels; audio_codec: e.g. "aac".
    """

    frames: int
    video_end_s: float
    frame_s: float
    keyframes: list[float]
    monotonic: bool
    audio_end_s: float | None
    audio_gaps: int
    width: int = 0
    height: int = 0
    audio_codec: str | None = None


def read_facts(path: Path) -> StreamFacts:
    """Demux `path` once (first video and audio stream). Raises av.FFmpegError (unreadable) or
    ValueError (no video stream)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        rate = video.average_rate or video.guessed_rate or Fraction(30)
        width, height = video.codec_context.width, video.codec_context.height
        frames, video_end, last_dts, monotonic = 0, Fraction(0), None, True
        keyframes: list[float] = []
        audio_end: Fraction | None = None
        audio_next: int | None = None
        gaps = 0
        streams = [video] if audio is None else [video, audio]
        for packet in container.demux(streams):
            if packet.pts is None or packet.time_base is None:
                continue  # the demuxer's flush packets
            duration = packet.duration or 0
            end = (packet.pts + duration) * packet.time_base
            if packet.stream.type == "video":
                frames += 1
                if last_dts is not None and packet.dts is not None and packet.dts <= last_dts:
                    monotonic = False
                last_dts = packet.dts
                video_end = max(video_end, end)
                if packet.is_keyframe:
                    keyframes.append(float(packet.pts * packet.time_base))
            else:
                if audio_next is not None and packet.pts != audio_next:
                    gaps += 1
                audio_next = packet.pts + duration
                audio_end = end
    return StreamFacts(
        frames=frames,
        video_end_s=float(video_end),
        frame_s=float(1 / rate),
        keyframes=sorted(keyframes),
        monotonic=monotonic,
        audio_end_s=None if audio_end is None else float(audio_end),
        audio_gaps=gaps,
        width=width,
        height=height,
        audio_codec=None if audio is None else audio.codec_context.name,
    )


def choose_cuts(keyframes: list[float], duration_s: float, pieces: int) -> list[float]:
    """Cut times (seconds, each a keyframe's) that split `duration_s` into at most `pieces`
    pieces of about equal length: for each of the N - 1 even split points, the nearest keyframe
    that is neither the first frame nor a cut already taken. Fewer keyframes, fewer pieces."""
    inner = [k for k in keyframes if 0 < k < duration_s]
    cuts: list[float] = []
    for i in range(1, pieces):
        target = duration_s * i / pieces
        free = [k for k in inner if k not in cuts]
        if not free:
            break
        cuts.append(min(free, key=lambda k: abs(k - target)))
    return sorted(cuts)


def idle_workers(client: redis.Redis) -> int:
    """Worker processes with nothing to run, over every node's live heartbeat, counting the one
    asking (it is about to hand its job to the pieces); at least 1."""
    total = 0
    for name in client.smembers(keys.NODES):
        raw = client.get(keys.heartbeat(str(name)))
        if raw is None:
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            beat = json.loads(raw)
            total += len(beat.get("workers", [])) - len(beat.get("running_jobs", []))
    return max(1, total + 1)


def auto_pieces(duration_s: float, idle: int, min_piece_s: float) -> int:
    """`--split auto`: one piece per idle worker, but no piece shorter than min_piece_s."""
    return max(1, min(idle, int(duration_s // min_piece_s), MAX_SPLIT))


def cut_command(
    ffmpeg: str, source: Path, cuts: list[float], frame_s: float, pattern: Path
) -> list[str]:
    """Cut the first video stream at `cuts` (keyframe times) without re-encoding. The segment
    muxer cuts at the first keyframe at or after each time, so each is given half a frame early
    (rounding must not push it past its keyframe). Audio stays out: it is muxed in at the join."""
    times = ",".join(f"{max(0.0, cut - frame_s / 2):.6f}" for cut in cuts)
    return [
        ffmpeg, "-i", str(source), "-map", "0:v:0", "-c", "copy",
        "-f", "segment", "-segment_times", times, "-segment_format", "mp4",
        "-reset_timestamps", "1", "-y", str(pattern),
    ]  # fmt: skip


def join_command(
    ffmpeg: str, concat_list: Path, source: Path, plan: Plan, output: Path
) -> list[str]:
    """Join the encoded pieces (concat demuxer, video copied) and take the audio tracks and
    subtitles from the source once, as a single pass would (`plan`: the stream plan of the
    whole job, workers/transcode/plan.py): each copied or converted, or left out."""
    args = [ffmpeg, "-f", "concat", "-safe", "0", "-i", str(concat_list), "-i", str(source)]
    args += ["-map", "0:v:0"]
    for choice in (*plan.audio, *plan.subtitles):
        args += ["-map", f"1:{choice.index}"]
    args += ["-c:v", "copy"]
    for n, choice in enumerate(plan.audio):
        if choice.action == "kept":
            args += [f"-c:a:{n}", "copy"]
        else:
            args += [f"-c:a:{n}", "aac", f"-b:a:{n}", str(choice.bitrate)]
    for n, choice in enumerate(plan.subtitles):
        args += [f"-c:s:{n}", "copy" if choice.action == "kept" else str(choice.to)]
    if plan.container in tc.MOOV_CONTAINERS:
        args += ["-movflags", "+faststart"]
    return [*args, "-y", str(output)]


def check_joined(
    source: StreamFacts, joined: StreamFacts, audio: AudioMode, same_frames: bool = True
) -> str | None:
    """None when the joined output matches the source, else one line saying what is wrong: the
    same frame count (unless `same_frames` is False: a constant output rate was asked for),
    timestamps increasing, duration within one frame, audio (unless dropped) as long as the
    source's (within one frame) and without gaps."""
    if same_frames and joined.frames != source.frames:
        return f"joined output has {joined.frames} frames, the source {source.frames}"
    if not joined.monotonic:
        return "joined output's video timestamps go backwards"
    if abs(joined.video_end_s - source.video_end_s) > source.frame_s + 1e-6:
        return (
            f"joined output lasts {joined.video_end_s:.3f} s, the source "
            f"{source.video_end_s:.3f} s (more than one frame apart)"
        )
    if audio == "none" or source.audio_end_s is None:
        return None
    if joined.audio_end_s is None:
        return "joined output has no audio, the source has"
    if abs(joined.audio_end_s - source.audio_end_s) > source.frame_s + 1e-6:
        return (
            f"joined audio lasts {joined.audio_end_s:.3f} s, "
            f"the source's {source.audio_end_s:.3f} s"
        )
    if joined.audio_gaps > source.audio_gaps:
        return f"joined audio has {joined.audio_gaps} gaps"
    return None


def work_dir(output: Path, job_id: str) -> Path:
    """The hidden folder beside the output that holds a split job's cut and encoded pieces."""
    return output.with_name(f".{output.stem}.{job_id}.split")


def piece_id(job_id: str, index: int) -> str:
    return f"{job_id}-p{index}"


def piece_spec(parent: TranscodeSpec, piece_input: str, piece_output: str) -> TranscodeSpec:
    """A piece encodes like its parent, video only (the parent muxes audio in at the join)."""
    values = parent.model_dump(exclude={"split"})
    return TranscodeSpec.model_validate(
        {**values, "input": piece_input, "output": piece_output, "audio": "none"}
    )


def send_piece(
    store: JobStore, app: Celery, parent: JobRecord, index: int, spec: dict[str, Any]
) -> str:
    """Record piece `index` of `parent` and queue it on the shared transcode queue (pieces go to
    whichever workers are free; those of a job that requires a GPU, to any GPU worker); its id."""
    job_id = piece_id(parent.id, index)
    dumped = spec
    queue = shared_transcode_queue(str(spec.get("gpu", "auto")))
    store.create(JobRecord(
        id=job_id, kind=JobKind.TRANSCODE, state=JobState.QUEUED, spec=dumped,
        queue=queue, parent=parent.id, created_at=time.time(),
    ))  # fmt: skip
    app.send_task(
        TRANSCODE_TASK, args=[job_id, dumped], task_id=job_id, queue=queue,
        argsrepr=task_argsrepr(dumped), priority=broker_priority(int(spec.get("priority", 5))),
    )  # fmt: skip
    return job_id


def send_join(app: Celery, parent: JobRecord) -> None:
    """Queue the delivery that joins a split job (a duplicate is turned away by its lease)."""
    app.send_task(
        TRANSCODE_TASK, args=[parent.id, parent.spec], queue=parent.queue or TRANSCODE_QUEUE,
        argsrepr=task_argsrepr(parent.spec),
        priority=broker_priority(int(parent.spec.get("priority", 5))),
    )  # fmt: skip


def run_split(
    rt: WorkerRuntime,
    app: Celery,
    job_id: str,
    worker: str,
    attempt_class: type[SplitAttempt] | None = None,
) -> dict[str, Any]:
    """One delivery of a split job's parent: plan it, or join it once every piece succeeded.
    attempt_class: SplitAttempt (default) or a subclass that makes and joins other pieces."""
    before = rt.store.get(job_id)
    if (
        before is not None
        and before.state is JobState.RUNNING
        and before.pieces
        and rt.store.redis.scard(keys.split_done(job_id)) < len(before.pieces)
        and not any(p and p.state is JobState.FAILED for p in map(rt.store.get, before.pieces))
    ):
        # A duplicate delivery while the pieces run: nothing to do, and no attempt to spend.
        return {"skipped": "pieces running"}
    claim = rt.leases.claim(job_id, worker, rt.settings.node_name, rt.gpu_label)
    if not claim.claimed:
        log.info("split job %s not run: %s", job_id, claim.outcome)
        return {"skipped": claim.outcome}
    record = rt.store.get(job_id)
    assert record is not None
    with LeaseKeeper(rt.leases, job_id, claim.token) as keeper:
        kind = attempt_class or SplitAttempt
        result = kind(rt, app, record, claim.attempt, keeper, worker).run()
    # A piece that finished while this delivery held the lease had its join turned away: if the
    # set is complete now, send the join again (a duplicate finds the job leased or finished).
    current = rt.store.get(job_id)
    if (
        current is not None
        and current.state is JobState.RUNNING
        and current.pieces
        and rt.store.redis.scard(keys.split_done(job_id)) == len(current.pieces)
        and "joined" not in result
    ):
        send_join(app, current)
    return result


class SplitAttempt(TranscodeAttempt):
    """One attempt of a split job's parent: `plan` while it has no pieces, else `join`.

    A split ladder (workers/transcode/ladder_split.py) changes what a piece is
    (`piece_values`) and how the pieces are joined (`join_pieces`)."""

    whole: TranscodeSpec | LadderSpec

    def __init__(
        self,
        rt: WorkerRuntime,
        app: Celery,
        record: JobRecord,
        attempt: int,
        keeper: LeaseKeeper,
        worker: str,
    ) -> None:
        self.rt, self.app, self.store = rt, app, rt.store
        self.job_id = record.id
        self.attempt, self.keeper, self.worker = attempt, keeper, worker
        self.started_at = time.time()
        self._later: dict[str, Any] = {}  # as TranscodeAttempt: fields held for the next write
        self.whole = self.parse(record.spec)

    def parse(self, spec: dict[str, Any]) -> TranscodeSpec | LadderSpec:
        return TranscodeSpec.model_validate(spec)

    def piece_values(
        self, index: int, piece_input: str, work: Path, output: Path
    ) -> dict[str, Any]:
        """Piece `index`'s spec: an encode of its cut piece into the work folder, no audio."""
        assert isinstance(self.whole, TranscodeSpec)
        media = self.rt.settings.media.resolve()
        encoded = (work / f"enc{index:03d}{output.suffix}").relative_to(media).as_posix()
        return piece_spec(self.whole, piece_input, encoded).model_dump(mode="json")

    def run(self) -> dict[str, Any]:
        record = self.store.get(self.job_id)
        if record is not None and record.pieces:
            return self.join(record)
        return self.plan()

    def plan(self) -> dict[str, Any]:
        rt, spec = self.rt, self.whole
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        try:
            facts = read_facts(source_path)
        except (av.FFmpegError, ValueError, OSError) as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc}")
        if spec.split == "auto":
            pieces = auto_pieces(
                facts.video_end_s, idle_workers(self.store.redis), rt.settings.split_min_piece_s
            )
        else:
            pieces = int(spec.split or 1)
        cuts = choose_cuts(facts.keyframes, facts.video_end_s, pieces)
        if not cuts:
            log.info("job %s: one piece (%d asked, keyframes %s)", self.job_id, pieces,
                     facts.keyframes[:8])  # fmt: skip
            return self.single_pass(pieces)
        work = work_dir(output_path, self.job_id)
        shutil.rmtree(work, ignore_errors=True)  # an earlier plan attempt died half-way
        work.mkdir(parents=True)
        command = cut_command(rt.ffmpeg, source_path, cuts, facts.frame_s, work / "cut%03d.mp4")
        outcome = tc.run_ffmpeg(command, lambda _: None, self.should_stop)
        if outcome.stopped:
            shutil.rmtree(work, ignore_errors=True)
            return self.stopped()
        cut_files = sorted(work.glob("cut*.mp4"))
        if outcome.returncode != 0 or len(cut_files) != len(cuts) + 1:
            tail = " | ".join(outcome.stderr_tail[-3:]) or f"{len(cut_files)} pieces"
            shutil.rmtree(work, ignore_errors=True)
            return self.fail(f"cutting the input at keyframes failed: {tail}")
        ids = [piece_id(self.job_id, i) for i in range(len(cut_files))]
        # The pieces' ids go into the record first: a cancel from now on reaches them, and a
        # later delivery that finds a piece missing sends it.
        if not self.update(pieces=ids, encode_path="split", percent=0.0):
            return self.stopped()
        record = self.store.get(self.job_id)
        assert record is not None
        media = rt.settings.media.resolve()
        for index, cut_file in enumerate(cut_files):
            piece_in = cut_file.relative_to(media).as_posix()
            values = self.piece_values(index, piece_in, work, output_path)
            send_piece(self.store, self.app, record, index, values)
        if self.should_stop():  # cancelled while the pieces were sent
            cancel_pieces(self.store, ids)
            return self.stopped()
        self.history("planned", f"{len(ids)} pieces cut at {', '.join(f'{c:.3f}' for c in cuts)} s")
        log.info("job %s split into %d pieces at %s", self.job_id, len(ids), cuts)
        return {"pieces": ids, "cuts_s": cuts}

    def single_pass(self, asked: int) -> dict[str, Any]:
        """Nothing to split (one piece asked, or too few keyframes): the job goes back to its
        queue as an ordinary transcode (its spec without `split`), where it takes an NVENC slot
        like any other."""
        whole = self.whole.model_dump(mode="json", exclude={"split"})
        reason = f"one piece ({asked} asked): queued as a single-pass encode"
        if not self.update(state=JobState.QUEUED, spec=whole, percent=0.0, eta_s=None):
            return self.stopped()
        self.history("planned", reason)
        record = self.store.get(self.job_id)
        queue = record.queue if record is not None and record.queue else TRANSCODE_QUEUE
        self.app.send_task(
            TRANSCODE_TASK, args=[self.job_id, whole], task_id=self.job_id, queue=queue,
            argsrepr=task_argsrepr(whole), priority=broker_priority(self.whole.priority),
        )  # fmt: skip
        return {"single_pass": reason}

    def join(self, record: JobRecord) -> dict[str, Any]:
        assert record.pieces is not None
        pieces = [self.store.get(piece) for piece in record.pieces]
        for index, piece in enumerate(pieces):
            if piece is not None and piece.state is JobState.FAILED:
                cancel_pieces(self.store, record.pieces)
                return self.fail(f"piece {index + 1}/{len(pieces)} failed: {piece.error}")
        if not all(p is not None and p.state is JobState.SUCCEEDED for p in pieces):
            return {"waiting": [p.id for p in pieces if p is not None and not p.state.terminal]}
        return self.join_pieces(record, [p for p in pieces if p is not None])

    def join_pieces(self, record: JobRecord, pieces: list[JobRecord]) -> dict[str, Any]:
        """Every piece succeeded: concat them, mux the audio in, check, rename into place."""
        rt, spec = self.rt, self.whole
        assert isinstance(spec, TranscodeSpec)
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        work = work_dir(output_path, self.job_id)
        encoded = [rt.media_path(str(p.spec["output"])) for p in pieces if p is not None]
        concat_list = work / "pieces.ffconcat"
        lines = ["ffconcat version 1.0", *(f"file '{path.name}'" for path in encoded)]
        concat_list.write_text("\n".join(lines) + "\n")
        source = read_facts(source_path)
        for stale in tc.stale_temporaries(output_path, self.job_id):
            stale.unlink(missing_ok=True)
        temp_path = tc.temporary_output(output_path, self.job_id, self.attempt)
        began = time.monotonic()
        try:
            plan = plan_streams(spec, probe(source_path, first_frame=False))
        except (ProbeError, ValueError) as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc}")
        command = join_command(rt.ffmpeg, concat_list, source_path, plan, temp_path)
        log.info("job %s join: %s", self.job_id, " ".join(command))
        try:
            outcome = tc.run_ffmpeg(command, lambda _: None, self.should_stop)
            if outcome.stopped:
                return self.stopped()
            if outcome.returncode != 0:
                tail = " | ".join(outcome.stderr_tail[-3:]) or "no output"
                return self.fail(f"joining the pieces failed: ffmpeg exited with "
                                 f"{outcome.returncode}: {tail}")  # fmt: skip
            try:
                joined = read_facts(temp_path)
            except (av.FFmpegError, ValueError) as exc:
                return self.fail(f"the joined output is unreadable: {exc}")
            problem = check_joined(source, joined, spec.audio, same_frames=spec.fps is None)
            if problem:
                return self.fail(f"joined output failed validation: {problem}")
            if self.should_stop():
                return self.stopped()
            temp_path.replace(output_path)
        finally:
            temp_path.unlink(missing_ok=True)
        finished = [p for p in pieces if p is not None]
        summary = {
            "output": spec.output,
            "pieces": len(finished),
            "frames": joined.frames,
            "duration_s": round(joined.video_end_s, 3),
            "audio_duration_s": joined.audio_end_s,
            "input_duration_s": round(source.video_end_s, 3),
            "encode_path": "split",
            "piece_elapsed_s": [(p.result or {}).get("elapsed_s") for p in finished],
            "join_elapsed_s": round(time.monotonic() - began, 3),
            "elapsed_s": round(time.time() - record.created_at, 3),
        }
        if self.update(state=JobState.SUCCEEDED, percent=100.0, eta_s=0, fps=None, speed=None,
                       output=spec.output, result=summary):  # fmt: skip
            self.history("succeeded")
            shutil.rmtree(work, ignore_errors=True)
            self.store.redis.delete(keys.split_done(self.job_id))
        return {**summary, "joined": True}


def after_piece(rt: WorkerRuntime, app: Celery, job_id: str, is_piece: bool | None = None) -> None:
    """After a delivery of piece `job_id`: count it done and send the join when it completes
    the set; a piece that failed for good fails its parent and cancels its siblings.
    is_piece: whether the job is a piece, when the caller knows (False: nothing is read)."""
    if is_piece is False:
        return
    store = rt.store
    piece = store.get(job_id)
    if piece is None or piece.parent is None:
        return
    parent = store.get(piece.parent)
    if parent is not None and parent.state is JobState.CANCELLED and parent.pieces:
        remove_work_when_settled(rt, parent)
    if parent is None or parent.state is not JobState.RUNNING or not parent.pieces:
        return
    if piece.state is JobState.SUCCEEDED:
        done_key = keys.split_done(parent.id)
        with store.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(done_key, job_id)
            pipe.scard(done_key)
            pipe.expire(done_key, store.record_ttl_s)
            added, count, _ = pipe.execute()
        if added and count == len(parent.pieces):
            log.info("job %s: last piece %s done, joining", parent.id, job_id)
            send_join(app, parent)
    elif piece.state is JobState.FAILED:  # (the watchdog does this too: workers/recovery.py)
        fail_parent(store, piece)


def remove_work_when_settled(rt: WorkerRuntime, parent: JobRecord) -> None:
    """A cancelled split job's pieces folder goes once no piece of it runs any more."""
    pieces = [rt.store.get(piece) for piece in parent.pieces or []]
    if all(p is None or p.state.terminal for p in pieces):
        with contextlib.suppress(PathOutsideMediaRoot):
            shutil.rmtree(work_dir(rt.media_path(str(parent.spec["output"])), parent.id), True)
