"""Celery task messages written without Celery's producer, so a submit is one round trip.

Celery's `send_task` costs two round trips and about a millisecond of Python per message, and
cannot share a round trip with the job record. gpujobs therefore writes the message itself, in
the exact form kombu's Redis transport reads (Celery task protocol 2, body base64 in a JSON
envelope, pushed on the queue's list for its priority step), together with the record, so a
submit is one script call (`JobStore.submit`), and so is a bulk submit's whole batch.
`tests/test_submit.py` runs these messages through a real worker and Flower.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.utils.time import utcoffset

from gpujobs.app import TRANSCODE_TASK, broker_priority, task_argsrepr
from gpujobs.specs import (
    JobKind,
    JobRecord,
    JobState,
    TranscodeSpec,
    compact_json,
    new_job_id,
)
from gpujobs.store import Submission

# kombu's Redis transport: queue name and priority step joined by this to name a list.
_PRIORITY_SEP = "\x06\x16"
# No callbacks, errbacks, chain or chord: Celery reads each with .get(), so an empty dict does.
_EMBED: dict[str, Any] = {}


def _b64(value: Any) -> str:
    """`value` as compact JSON (see `compact_json`; kombu reads any), base64-encoded (kombu's
    body_encoding "base64")."""
    return base64.b64encode(compact_json(value).encode()).decode()


@dataclass
class TaskMessages:
    """Builds Celery task messages (and their task-sent events) as kombu's Redis transport
    stores them, for one app and broker URL.

    `send_events`: whether to build the task-sent event Flower uses to show a queued job
    (the app's `task_send_sent_event`).
    """

    app: Celery
    broker_url: str

    def __post_init__(self) -> None:
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.send_events = bool(self.app.conf.task_send_sent_event)
        path = urlsplit(self.broker_url).path.strip("/")
        db = int(path) if path.isdigit() else 0
        # kombu's fanout topic for the events exchange (fanout_patterns on, its default).
        self.event_channel = f"/{db}.celeryev/task.sent"

    @staticmethod
    def queue_list(queue: str, priority_step: int) -> str:
        """The Redis list holding `queue`'s messages of one priority step (0 is the plain name)."""
        return f"{queue}{_PRIORITY_SEP}{priority_step}" if priority_step else queue

    def message(
        self,
        task: str,
        task_id: str,
        args: list[Any],
        argsrepr: str,
        queue: str,
        priority_step: int,
    ) -> str:
        """One task message, as `send_task(task, args, task_id=, queue=, priority=)` writes
        it (protocol 2: args, no kwargs, no callbacks; no countdown, expiry or time limit)."""
        headers = {**_HEADERS, "task": task, "id": task_id, "root_id": task_id,
                   "argsrepr": argsrepr, "origin": self.origin}  # fmt: skip
        envelope = {
            "body": _b64([args, {}, _EMBED]),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": priority_step,
                "body_encoding": "base64",
                "delivery_tag": _delivery_tag(),
            },
        }
        return compact_json(envelope)

    def sent_event(self, task: str, task_id: str, argsrepr: str, queue: str) -> str:
        """The task-sent event Celery publishes for that message ("" when events are off)."""
        if not self.send_events:
            return ""
        event = {
            **_SENT_EVENT, "hostname": self.origin, "utcoffset": utcoffset(), "pid": os.getpid(),
            "clock": self.app.clock.forward(), "uuid": task_id, "root_id": task_id, "name": task,
            "args": argsrepr, "queue": queue, "routing_key": queue, "timestamp": time.time(),
        }  # fmt: skip
        envelope = {
            "body": _b64(event),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": self.origin},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": _EVENT_DELIVERY,
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": _delivery_tag(),
            },
        }
        return compact_json(envelope)


def _delivery_tag() -> str:
    """A new delivery tag: 128 random bits in UUID text form, as kombu's `str(uuid4())` (kombu
    only keys the message by it; version bits are not set), at a third of uuid4's cost."""
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# What every task message's headers and every task-sent event hold alike (the rest is set
# per message); never changed, only copied.
_HEADERS: dict[str, Any] = {
    "lang": "py", "shadow": None, "eta": None, "expires": None, "group": None,
    "group_index": None, "retries": 0, "timelimit": [None, None], "parent_id": None,
    "kwargsrepr": "{}", "ignore_result": None, "replaced_task_nesting": 0,
    "stamped_headers": None, "stamps": {},
}  # fmt: skip
_SENT_EVENT: dict[str, Any] = {
    "parent_id": None, "kwargs": "{}", "retries": 0, "eta": None, "expires": None,
    "exchange": "", "type": "task-sent",
}  # fmt: skip
_EVENT_DELIVERY = {"exchange": "celeryev", "routing_key": "task.sent"}


# The third argument of a transcode message whose job is a plain one: not split, not a ladder.
PLAIN = "plain"


def _transcode_args(job_id: str, spec: TranscodeSpec) -> list[Any]:
    return [job_id] if spec.split is not None else [job_id, None, PLAIN]


def transcode_submission(
    messages: TaskMessages, spec: TranscodeSpec, queue: str, fingerprint: str | None
) -> Submission:
    """A new transcode job for `JobStore.submit`: its record (queued, a new 12-hex id), its
    message for `queue` at the spec's priority step, its task-sent event. fingerprint: the
    duplicate-check key (None: no check)."""
    dumped = spec.model_dump(mode="json")
    job_id = new_job_id()
    record = JobRecord(
        id=job_id,
        kind=JobKind.TRANSCODE,
        state=JobState.QUEUED,
        spec=dumped,
        queue=queue,
        created_at=time.time(),
    )
    # What Flower shows as the arguments: the spec in brief, not the raw dict.
    argsrepr = task_argsrepr(dumped)
    step = broker_priority(spec.priority)
    return Submission(
        record=record,
        # The job id, not the spec: the worker reads the spec from the record (its claim
        # reads the record anyway), so the spec is not kept twice in Redis while the job
        # waits. A job that is neither split nor a ladder says so (PLAIN), so the worker goes
        # straight to its claim without reading the record first to tell.
        message=messages.message(
            TRANSCODE_TASK, job_id, _transcode_args(job_id, spec), argsrepr, queue, step
        ),
        queue_list=messages.queue_list(queue, step),
        event=messages.sent_event(TRANSCODE_TASK, job_id, argsrepr, queue),
        event_channel=messages.event_channel,
        fingerprint=fingerprint,
    )
