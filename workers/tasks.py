"""Celery task bodies. Producers reach them by name only (gpujobs.app names them)."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, Task

from gpujobs.app import TRANSCODE_TASK
from gpujobs.specs import JobState, TranscodeSpec
from workers import transcode as tc
from workers.probe import ProbeError, probe
from workers.runtime import PathOutsideMediaRoot, WorkerRuntime, runtime

log = logging.getLogger(__name__)


class JobRunFailed(Exception):
    """Raised after the failure is recorded, so Celery (and Flower) show the same reason."""


def register_tasks(app: Celery) -> None:
    """Bind the task bodies to `app` under the names producers send."""

    @app.task(name=TRANSCODE_TASK, bind=True)
    def transcode(self: Task, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        return run_transcode(runtime(), job_id, worker=self.request.hostname or "worker")


def run_transcode(rt: WorkerRuntime, job_id: str, worker: str) -> dict[str, Any]:
    """Run one transcode job from its record to a validated output (or a recorded failure)."""
    store = rt.store
    record = store.get(job_id)
    if record is None:
        log.warning("job %s has no record (expired?); skipped", job_id)
        return {"skipped": "no record"}
    if record.state.terminal:
        return {"skipped": record.state.value}
    started = store.update(
        job_id,
        only_from=(JobState.QUEUED, JobState.RUNNING),
        state=JobState.RUNNING,
        worker=worker,
        node=rt.settings.node_name,
        gpu=rt.gpu_label,
        attempt=record.attempt + 1,
        started_at=time.time(),
        percent=0.0,
        error=None,
    )
    if not started:
        return {"skipped": "cancelled"}

    def fail(reason: str) -> dict[str, Any]:
        store.update(
            job_id, only_from=(JobState.RUNNING,), state=JobState.FAILED, error=reason, eta_s=None
        )
        raise JobRunFailed(reason)

    spec = TranscodeSpec.model_validate(record.spec)
    try:
        source_path = rt.media_path(spec.input)
        output_path = rt.media_path(spec.output)
    except PathOutsideMediaRoot as exc:
        return fail(str(exc))
    try:
        source = probe(rt.ffmpeg, source_path)
    except ProbeError as exc:
        return fail(f"cannot read the input {spec.input}: {exc}")
    try:
        path = tc.choose_path(spec, rt.capabilities)
    except tc.NoGpuPath as exc:
        return fail(str(exc))
    width, height = tc.output_size(spec, source)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = tc.temporary_output(output_path, job_id)
    command = tc.build_command(
        rt.ffmpeg, spec, path, str(source_path), str(temp_path), width, height
    )
    store.update(job_id, only_from=(JobState.RUNNING,), encode_path=path.value)
    log.info("job %s: %s", job_id, " ".join(command))
    throttle = tc.Throttle(rt.settings.progress_interval_s)
    began = time.monotonic()

    def on_progress(sample: tc.ProgressSample) -> None:
        if not throttle.ready(force=sample.done):
            return
        percent = min(100.0, 100.0 * sample.out_time_s / source.duration_s)
        remaining = max(0.0, source.duration_s - sample.out_time_s)
        eta = remaining / sample.speed if sample.speed else None
        store.update(
            job_id,
            only_from=(JobState.RUNNING,),
            percent=round(percent, 1),
            fps=sample.fps,
            speed=sample.speed,
            eta_s=eta and round(eta, 1),
        )

    stop_check = tc.Throttle(0.5)

    def should_stop() -> bool:
        if not stop_check.ready():
            return False
        current = store.get(job_id)
        return current is None or current.state is not JobState.RUNNING

    try:
        outcome = tc.run_ffmpeg(command, on_progress, should_stop)
        if outcome.stopped:
            log.info("job %s stopped (%s)", job_id, "cancelled")
            return {"stopped": True}
        if outcome.returncode != 0:
            tail = " | ".join(outcome.stderr_tail[-3:]) or "no output"
            return fail(f"ffmpeg exited with {outcome.returncode}: {tail}")
        try:
            result = probe(rt.ffmpeg, temp_path)
        except ProbeError as exc:
            return fail(f"ffmpeg wrote an unreadable output: {exc}")
        problem = tc.validate_output(result, source, spec, width, height)
        if problem:
            return fail(f"output failed validation: {problem}")
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
    finished = store.update(
        job_id,
        only_from=(JobState.RUNNING,),
        state=JobState.SUCCEEDED,
        percent=100.0,
        eta_s=0,
        output=spec.output,
        result=summary,
    )
    if not finished:  # cancelled in the last instant: the output stands, the record says so
        log.info("job %s finished after it was cancelled", job_id)
    return summary
