"""One transcode job from delivery to a validated output: claim, run, validate, record.

Every record write is fenced on this attempt, so a worker that lost its lease (and whose job was
requeued) can no longer change the record; its ffmpeg is stopped as soon as it notices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from gpujobs.media import MediaInfo, ProbeError, probe
from gpujobs.specs import JobRecord, JobState, TranscodeSpec
from workers.lease import LeaseKeeper
from workers.recovery import backoff_s, requeue
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime
from workers.transcode import command as tc
from workers.transcode.plan import plan_streams
from workers.transcode.source import probe_source
from workers.transcode.validate import expected_duration, failure_reason, validate_output

log = logging.getLogger(__name__)


# Containers whose header describes every stream (what validation reads: codecs, sizes, SAR,
# rotation, durations, frame counts): their output is read from the header alone, with the
# demuxer ffmpeg's muxer for that extension pairs with (no guess from the file's bytes).
HEADER_CONTAINERS = {
    ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
}  # fmt: skip


def probe_output(path: Path) -> MediaInfo:
    """What an encode wrote, for validation: the header alone where the container describes
    every stream there (0.4 ms here against 0.7 to 1.2 ms for the full read that decodes a
    first frame), else, or when the header shows no sized video, the full read. Raises
    ProbeError as `probe` does."""
    demuxer = HEADER_CONTAINERS.get(path.suffix.lower())
    if demuxer is not None:
        info = probe(path, first_frame=False, quick=True, format=demuxer)
        if info.video is not None and info.video.width:
            return info
    return probe(path)


class JobRunFailed(Exception):
    """Raised after the failure is recorded, so Celery (and Flower) show the same reason."""


def run_transcode(
    rt: WorkerRuntime,
    app: Celery,
    job_id: str,
    worker: str,
    on_record: Callable[[JobRecord], None] | None = None,
) -> dict[str, Any]:
    """Run one delivery of a transcode job. A delivery of a job that is finished, cancelled or
    leased by a live attempt returns at once without running (it is acknowledged).
    on_record: called with the record after each progress write (Flower's relay)."""
    claim = rt.leases.claim(job_id, worker, rt.settings.node_name, rt.gpu_label)
    if not claim.claimed:
        log.info("job %s not run: %s", job_id, claim.outcome)
        return {"skipped": claim.outcome}
    # The claim returns the record as it left it: no second read.
    record = JobRecord.from_hash(claim.record) if claim.record else rt.store.get(job_id)
    assert record is not None
    with LeaseKeeper(rt.leases, job_id, claim.token) as keeper:
        attempt = TranscodeAttempt(rt, app, record, claim.attempt, keeper, worker, on_record)
        return attempt.run()


class TranscodeAttempt:
    """One attempt at one job, owning its lease while it runs."""

    # Told the record after each progress write (Flower's relay); subclasses with their own
    # constructor (a ladder's attempt) have none and keep the relay's subscription.
    on_record: Callable[[JobRecord], None] | None = None
    # ffmpeg's log, not kept yet: it goes with the last stop check, or before an end.
    _log: list[str] | None = None

    def __init__(
        self,
        rt: WorkerRuntime,
        app: Celery,
        record: JobRecord,
        attempt: int,
        keeper: LeaseKeeper,
        worker: str,
        on_record: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.rt = rt
        self.record = record  # as claimed, then with each progress write
        self.on_record = on_record
        self.app = app
        self.store = rt.store
        self.job_id = record.id
        self.spec = TranscodeSpec.model_validate(record.spec)
        self.attempt = attempt
        self.keeper = keeper
        self.worker = worker
        self.started_at = time.time()
        # Fields to write with the next update rather than in a round trip of their own.
        self._later: dict[str, Any] = {}

    def update(self, **fields: Any) -> bool:
        """Write to the record while it is still this attempt's running job. Fields held back
        (`later`) go with it; a final write drops the lease too (see JobStore.update)."""
        fields = {**self._later, **fields}
        self._later = {}
        written = self.store.update(
            self.job_id, only_from=(JobState.RUNNING,), attempt=self.attempt, **fields
        )
        if written and fields.get("state") is not None:
            self.keeper.released = True  # the script dropped the lease with the change
        elif written and self.on_record is not None and "percent" in fields:
            shown = ("percent", "fps", "speed", "eta_s", "encode_path")
            self.record = self.record.model_copy(
                update={name: fields[name] for name in shown if name in fields}
            )
            self.on_record(self.record)
        return written

    def entry(self, outcome: str, reason: str | None = None) -> dict[str, Any]:
        """This attempt's line in the job's history."""
        return {
            "attempt": self.attempt, "worker": self.worker, "started_at": self.started_at,
            "ended_at": time.time(), "outcome": outcome, "reason": reason,
        }  # fmt: skip

    def history(self, outcome: str, reason: str | None = None) -> None:
        self.store.add_attempt(self.job_id, self.entry(outcome, reason))

    def fail(self, reason: str) -> dict[str, Any]:
        self.keep_log()
        # The history entry goes in with the state, in one step: readers never see one alone.
        self.update(state=JobState.FAILED, error=reason, eta_s=None,
                    history=self.entry("failed", reason))  # fmt: skip
        raise JobRunFailed(reason)

    def retry_later(self, reason: str) -> dict[str, Any]:
        """A transient failure: requeue with backoff, or fail once attempts are spent."""
        self.keep_log()
        delay = backoff_s(self.rt.settings.retry_backoff_s, self.attempt)
        requeue(self.store, self.app, self.job_id, self.attempt, reason,
                self.rt.settings.max_attempts, countdown_s=delay)  # fmt: skip
        current = self.store.get(self.job_id)
        if current is not None and current.state is JobState.FAILED:
            raise JobRunFailed(current.error or reason)
        return {"retry_in_s": delay, "reason": reason}

    def should_stop(self) -> bool:
        """Stop when the job was cancelled or requeued, or this attempt lost its lease."""
        if self.keeper.lost.is_set():
            return True
        text = self._take_log()
        if text is not None:  # the log is kept in the same round trip
            current = self.store.write_log_and_state(self.job_id, self.attempt, "ffmpeg", text)
        else:
            current = self.store.state_of(self.job_id)  # two fields, not the whole record
        return current is None or current != (JobState.RUNNING, self.attempt)

    def run(self) -> dict[str, Any]:
        rt, spec = self.rt, self.spec
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        if output_path == source_path:  # an output that is a link to the input
            return self.fail(f"output {spec.output} is the input {spec.input} (through a link)")
        if output_path.exists() and not spec.overwrite:
            return self.fail(f"output {spec.output} exists (submit with --overwrite to replace)")
        try:
            source = probe_source(source_path)
        except ProbeError as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc}")
        except OSError as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc.strerror or exc}")
        try:
            plan = plan_streams(spec, source)
        except ValueError as exc:
            return self.fail(f"cannot transcode {spec.input}: {exc}")
        try:
            route = tc.route(tc.choose_path(spec, rt.capabilities), plan.video)
        except tc.NoGpuPath as exc:
            return self.fail(str(exc))
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if self.attempt > 1:  # a first attempt has no earlier one that could have left one
            for stale in tc.stale_temporaries(output_path, self.job_id):
                stale.unlink(missing_ok=True)  # an earlier attempt died mid-write
        temp_path = tc.temporary_output(output_path, self.job_id, self.attempt)
        command = tc.build_command(rt.ffmpeg, spec, plan, route, str(source_path), str(temp_path))
        self._later["encode_path"] = route.path.value  # written with the first progress or the end
        log.info("job %s attempt %d: %s", self.job_id, self.attempt, " ".join(command))
        # Neither writes nor reads before its interval has passed once: a job shorter than
        # that (a tiny clip) goes from the claim's running to its end in two writes, and its
        # watchers see both.
        throttle = tc.Throttle(rt.settings.progress_interval_s, wait_first=True)
        stop_check = tc.Throttle(0.5, wait_first=True)
        began = time.monotonic()
        total_s = expected_duration(source, plan)

        def on_progress(sample: tc.ProgressSample) -> None:
            # ffmpeg's last block is not forced through: the end's own write sets 100%.
            if not throttle.ready():
                return
            if total_s:
                fraction: float | None = sample.out_time_s / total_s
            else:  # no duration (a raw stream): how much of the input ffmpeg has read
                fraction = sample.read_fraction
            eta = None
            if fraction is not None and sample.speed and total_s:
                eta = max(0.0, total_s - sample.out_time_s) / sample.speed
            elif fraction:
                eta = (time.monotonic() - began) * (1 - fraction) / fraction
            percent = None if fraction is None else round(min(100.0, 100.0 * fraction), 1)
            self.update(percent=percent, fps=sample.fps, speed=sample.speed,
                        eta_s=None if eta is None else round(eta, 1))  # fmt: skip

        try:
            outcome = tc.run_ffmpeg(
                command,
                on_progress,
                lambda: stop_check.ready() and self.should_stop(),
                input_file=source_path,
            )
            self._log = outcome.log  # kept by the next stop check, or before the end
            if outcome.stopped:
                return self.stopped()
            if outcome.returncode != 0:
                reason = failure_reason(outcome.log, outcome.returncode)
                if tc.is_transient(outcome.stderr_tail):
                    return self.retry_later(reason)
                return self.fail(reason)
            try:
                result = probe_output(temp_path)
            except ProbeError as exc:
                return self.fail(f"ffmpeg wrote an unreadable output: {exc}")
            frames = outcome.last.frame if outcome.last is not None else None
            problem = validate_output(result, source, spec, plan, decoded_frames=frames)
            if problem:
                return self.fail(f"output failed validation: {problem}")
            if self.should_stop():  # cancelled or taken over at the last instant: keep out
                return self.stopped()
            if not spec.overwrite and output_path.exists():
                return self.fail(f"output {spec.output} appeared while encoding; not replaced")
            temp_path.replace(output_path)  # readers never see a half-written file
        finally:
            self.keep_log()  # an unforeseen error still leaves the log (a no-op once kept)
            temp_path.unlink(missing_ok=True)
        assert result.video is not None
        summary = {
            "output": spec.output,
            "width": result.video.width,
            "height": result.video.height,
            "sar": str(result.video.sar),
            "video_codec": result.video.codec,
            "audio_codec": result.audio_codec,
            "audio_tracks": [a.codec for a in result.audio],
            "duration_s": result.duration_of(list(result.streams)),
            "input_duration_s": total_s,
            "frames": result.video.frames,
            "deinterlaced": plan.geometry.deinterlace,
            "rotated": plan.geometry.rotation,
            "mirrored": plan.geometry.mirrored or None,
            "streams": plan.record(),
            "encode_path": route.path.value,
            "decode": "gpu" if route.gpu_decode else "cpu",
            "decode_fallback": route.fallback,
            "ffmpeg": rt.ffmpeg_version,
            "elapsed_s": round(time.monotonic() - began, 3),
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        self.update(state=JobState.SUCCEEDED, percent=100.0, eta_s=0, output=spec.output,
                    result=summary, history=self.entry("succeeded"))  # fmt: skip
        return summary

    def keep_log(self) -> None:
        """Keep ffmpeg's whole stderr as this attempt's log (`gpujobs logs ID`), unless it is
        kept already or there is none."""
        text = self._take_log()
        if text is None:
            return
        try:
            self.store.write_log(self.job_id, self.attempt, "ffmpeg", text)
        except Exception:  # a log we could not keep never fails the job
            log.warning("job %s: could not keep the ffmpeg log", self.job_id, exc_info=True)

    def _take_log(self) -> str | None:
        """ffmpeg's log as text, once (None when kept already or there is none)."""
        if self._log is None:
            return None
        text, self._log = "\n".join(self._log) + "\n", None
        return text

    def stopped(self) -> dict[str, Any]:
        self.keep_log()
        current = self.store.get(self.job_id)
        why = current.state.value if current is not None else "record gone"
        if self.keeper.lost.is_set():
            why = "lease lost"
        if current is not None and current.state is JobState.CANCELLED:
            self.history("cancelled")
        log.info("job %s attempt %d stopped: %s", self.job_id, self.attempt, why)
        return {"stopped": why}
