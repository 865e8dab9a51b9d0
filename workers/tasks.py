"""Celery task bodies. Producers reach them by name only (gpujobs.app names them)."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from gpujobs import keys
from gpujobs.app import TRANSCODE_TASK
from gpujobs.publish import PLAIN
from gpujobs.specs import JobState
from workers.flower_progress import FlowerProgress
from workers.gpu import nvenc
from workers.inference.chunk import register_inference_task
from workers.runtime import runtime
from workers.transcode import ladder, split, split_progress
from workers.transcode.job import JobRunFailed, run_transcode
from workers.transcode.ladder_split import LadderSplitAttempt


def register_tasks(app: Celery) -> None:
    """Bind the task bodies to `app` under the names producers send."""
    register_inference_task(app)

    # A job that fails for a known reason (bad input, validation, attempts spent) is logged as
    # one line ("raised expected"), not as "raised unexpected" with a traceback.
    @app.task(name=TRANSCODE_TASK, bind=True, throws=(JobRunFailed,))
    def transcode(
        self: Task, job_id: str, spec: dict[str, Any] | None = None, kind: str | None = None
    ) -> str:
        # The message carries the job id only (the spec is in the record, read once when the
        # job is claimed); messages sent before that carry the spec too, and still work.
        # kind: PLAIN when the submit knew the job is neither split nor a ladder.
        rt = runtime()
        worker = self.request.hostname or "worker"
        # Whether it is a piece of a split job (None: not read yet, older messages): a job that
        # is not one skips the piece bookkeeping without reading its record for it.
        piece: bool | None = None
        if kind == PLAIN:  # nothing to read before the claim
            piece = False
        elif spec is None:  # what kind of transcode it is (a ladder, a split job) is in its spec
            raw, parent = rt.store.redis.hmget(keys.job(job_id), ["spec", "parent"])
            spec = json.loads(raw) if raw else {}
            piece = parent is not None
        shape = spec or {}  # a plain job's ({}: see PLAIN) is read by its claim
        if "renditions" in shape and shape.get("split") is not None:  # a split ladder's parent
            with FlowerProgress(self, rt.store.redis, job_id):
                result = split.run_split(rt, self.app, job_id, worker, LadderSplitAttempt)
        elif "renditions" in shape:  # an ABR ladder (or a piece of one): an NVENC session each
            with (
                ladder.job_slots(self, rt, job_id, shape),
                FlowerProgress(self, rt.store.redis, job_id),
                split_progress.piece_progress(rt.store, job_id, piece),
            ):
                try:
                    result = ladder.run_ladder(rt, self.app, job_id, worker)
                finally:
                    split.after_piece(rt, self.app, job_id, piece)
        elif shape.get("split") is not None:  # a split job's parent: plan or join (no NVENC)
            with FlowerProgress(self, rt.store.redis, job_id):
                result = split.run_split(rt, self.app, job_id, worker)
        else:
            # Flower shows the job's progress (state PROGRESS, the Result column) while it runs.
            # An NVENC job holds one of the node's NVENC sessions, or waits in its queue for one.
            # A piece of a split job also keeps its parent's combined progress current.
            # The body writes its own progress and hands each write to the relay (no channel
            # followed for Flower).
            flower = FlowerProgress(self, rt.store.redis, job_id, local=True)
            with (
                nvenc.job_slot(self, rt, job_id, spec),
                flower,
                split_progress.piece_progress(rt.store, job_id, piece),
            ):
                try:
                    result = run_transcode(
                        rt, self.app, job_id, worker=worker, on_record=flower.offer
                    )
                finally:  # a failed piece fails its parent too
                    split.after_piece(rt, self.app, job_id, piece)
        cancelled = JobState.CANCELLED.value
        if cancelled in (result.get("stopped"), result.get("skipped")):
            # Flower shows the job REVOKED rather than SUCCESS; Ignore acks without an event.
            self.send_event("task-revoked", terminated=True, signum=None, expired=False)
            raise Ignore()
        return brief(result)


def brief(result: dict[str, Any]) -> str:
    """A task's outcome in one line, as Celery keeps it (its result backend, the task-succeeded
    event, Flower's Result column): the job's record holds the whole result, which nothing
    reads from Celery. A transcode's: `out/talk.480p.mp4 | 854x480 h264 | audio aac | 10.0 s |
    cpu`; anything else (a split job's plan, a retry, a skip): its fields, `k=v` (a list or a
    dict as its length, `pieces=[4]`).
    Celery's saferepr of the whole result dict took about 0.1 ms a job, twice."""
    if "output" in result and "width" in result:
        duration = result.get("duration_s")
        return " | ".join([
            str(result["output"]),
            f"{result['width']}x{result.get('height')} {result.get('video_codec')}",
            f"audio {result.get('audio_codec') or 'none'}",
            "?" if duration is None else f"{duration:.1f} s",
            str(result.get("encode_path")),
        ])  # fmt: skip
    fields = [f"{key}={value}" if not isinstance(value, dict | list) else f"{key}=[{len(value)}]"
              for key, value in result.items()]  # fmt: skip
    return ", ".join(fields) or "done"
