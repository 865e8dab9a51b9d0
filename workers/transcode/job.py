"""One transcode job from delivery to a validated output: claim, run, validate, record.

Every record write is fenced on this attempt, so a worker that lost its lease (and whose job was
requeued) can no longer change the record; its ffmpeg is stopped as soon as it notices.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from gpujobs.media import ProbeError, probe
from gpujobs.specs import JobRecord, JobState, TranscodeSpec
from workers.lease import LeaseKeeper
from workers.recovery import backoff_s, requeue
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime
from workers.transcode import command as tc

log = logging.getLogger(__name__)


class JobRunFailed(Exception):
    """Raised after the failure is recorded, so Celery (and Flower) show the same reason."""


def run_transcode(rt: WorkerRuntime, app: Celery, job_id: str, worker: str) -> dict[str, Any]:
    """Run one delivery of a transcode job. A delivery of a job that is finished, cancelled or
    leased by a live attempt returns at once without running (it is acknowledged)."""
    claim = rt.leases.claim(job_id, worker, rt.settings.node_name, rt.gpu_label)
    if not claim.claimed:
        log.info("job %s not run: %s", job_id, claim.outcome)
        return {"skipped": claim.outcome}
    record = rt.store.get(job_id)
    assert record is not None
    with LeaseKeeper(rt.leases, job_id, claim.token) as keeper:
        attempt = TranscodeAttempt(rt, app, record, claim.attempt, keeper, worker)
        return attempt.run()


class TranscodeAttempt:
    """One attempt at one job, owning its lease while it runs."""

    def __init__(
        self,
        rt: WorkerRuntime,
        app: Celery,
        record: JobRecord,
        attempt: int,
        keeper: LeaseKeeper,
        worker: str,
    ) -> None:
        self.rt = rt
        self.app = app
        self.store = rt.store
        self.job_id = record.id
        self.spec = TranscodeSpec.model_validate(record.spec)
        self.attempt = attempt
        self.keeper = keeper
        self.worker = worker
        self.started_at = time.time()

    def update(self, **fields: Any) -> bool:
        """Write to the record while it is still this attempt's running job."""
        return self.store.update(
            self.job_id, only_from=(JobState.RUNNING,), attempt=self.attempt, **fields
        )

    def history(self, outcome: str, reason: str | None = None) -> None:
        self.store.add_attempt(self.job_id, {
            "attempt": self.attempt, "worker": self.worker, "started_at": self.started_at,
            "ended_at": time.time(), "outcome": outcome, "reason": reason,
        })  # fmt: skip

    def fail(self, reason: str) -> dict[str, Any]:
        if self.update(state=JobState.FAILED, error=reason, eta_s=None):
            self.history("failed", reason)
        raise JobRunFailed(reason)

    def retry_later(self, reason: str) -> dict[str, Any]:
        """A transient failure: requeue with backoff, or fail once attempts are spent."""
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
        current = self.store.get(self.job_id)
        return (
            current is None
            or current.state is not JobState.RUNNING
            or current.attempt != self.attempt
        )

    def run(self) -> dict[str, Any]:
        rt, spec = self.rt, self.spec
        try:
            source_path = rt.media_path(spec.input)
            output_path = rt.media_path(spec.output)
        except PathOutsideMediaRoot as exc:
            return self.fail(str(exc))
        try:
            source = probe(rt.ffmpeg, source_path)
        except ProbeError as exc:
            return self.fail(f"cannot read the input {spec.input}: {exc}")
        try:
            path = tc.choose_path(spec, rt.capabilities)
        except tc.NoGpuPath as exc:
            return self.fail(str(exc))
        width, height = tc.output_size(spec, source)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in tc.stale_temporaries(output_path, self.job_id):
            stale.unlink(missing_ok=True)  # an earlier attempt died mid-write
        temp_path = tc.temporary_output(output_path, f"{self.job_id}.{self.attempt}")
        command = tc.build_command(
            rt.ffmpeg, spec, path, str(source_path), str(temp_path), width, height
        )
        self.update(encode_path=path.value)
        log.info("job %s attempt %d: %s", self.job_id, self.attempt, " ".join(command))
        throttle = tc.Throttle(rt.settings.progress_interval_s)
        stop_check = tc.Throttle(0.5)
        began = time.monotonic()

        def on_progress(sample: tc.ProgressSample) -> None:
            if not throttle.ready(force=sample.done):
                return
            percent = min(100.0, 100.0 * sample.out_time_s / source.duration_s)
            remaining = max(0.0, source.duration_s - sample.out_time_s)
            eta = remaining / sample.speed if sample.speed else None
            self.update(percent=round(percent, 1), fps=sample.fps, speed=sample.speed,
                        eta_s=None if eta is None else round(eta, 1))  # fmt: skip

        try:
            outcome = tc.run_ffmpeg(
                command, on_progress, lambda: stop_check.ready() and self.should_stop()
            )
            if outcome.stopped:
                return self.stopped()
            if outcome.returncode != 0:
                tail = " | ".join(outcome.stderr_tail[-3:]) or "no output"
                reason = f"ffmpeg exited with {outcome.returncode}: {tail}"
                if tc.is_transient(outcome.stderr_tail):
                    return self.retry_later(reason)
                return self.fail(reason)
            try:
                result = probe(rt.ffmpeg, temp_path)
            except ProbeError as exc:
                return self.fail(f"ffmpeg wrote an unreadable output: {exc}")
            problem = tc.validate_output(result, source, spec, width, height)
            if problem:
                return self.fail(f"output failed validation: {problem}")
            if self.should_stop():  # cancelled or taken over at the last instant: keep out
                return self.stopped()
            temp_path.replace(output_path)  # readers never see a half-written file
        finally:
            temp_path.unlink(missing_ok=True)
        summary = {
            "output": spec.output,
            "width": result.width,
            "height": result.height,
            "video_codec": result.video_codec,
            "audio_codec": result.audio_codec,
            "duration_s": result.duration_s,
            "input_duration_s": source.duration_s,
            "encode_path": path.value,
            "elapsed_s": round(time.monotonic() - began, 3),
        }
        if self.update(state=JobState.SUCCEEDED, percent=100.0, eta_s=0, output=spec.output,
                       result=summary):  # fmt: skip
            self.history("succeeded")
        return summary

    def stopped(self) -> dict[str, Any]:
        current = self.store.get(self.job_id)
        why = current.state.value if current is not None else "record gone"
        if self.keeper.lost.is_set():
            why = "lease lost"
        if current is not None and current.state is JobState.CANCELLED:
            self.history("cancelled")
        log.info("job %s attempt %d stopped: %s", self.job_id, self.attempt, why)
        return {"stopped": why}
