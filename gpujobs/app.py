"""The Celery app: broker, queues, routing and the reliability settings every job relies on.

Producers use it only to send tasks by name (`send_task`); workers register the task bodies from
`workers.tasks` on the same app. Nothing here imports worker code.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from gpujobs import keys
from gpujobs.config import Settings

TRANSCODE_QUEUE = "transcode"
INFERENCE_QUEUE = "inference"
# Transcodes that require a GPU (`--gpu require`) with no node named: every worker with a GPU
# consumes it, no CPU-only worker does. ("-", not ".": no node's queue can have this name.)
GPU_TRANSCODE_QUEUE = "transcode-gpu"
TRANSCODE_TASK = "gpujobs.transcode"
INFERENCE_TASK = "gpujobs.inference_chunk"


def node_queue(node: str) -> str:
    """The transcode queue only the workers of `node` consume (`transcode.node-1`)."""
    return f"{TRANSCODE_QUEUE}.{node}"


def shared_transcode_queue(gpu_policy: str) -> str:
    """The queue of a transcode sent to no node in particular: GPU_TRANSCODE_QUEUE for one that
    requires a GPU (gpu_policy "require"), else the shared transcode queue."""
    return GPU_TRANSCODE_QUEUE if gpu_policy == "require" else TRANSCODE_QUEUE


def gpu_queue(node: str, gpu: int) -> str:
    """The transcode queue only the worker pinned to GPU `gpu` of `node` consumes
    (`transcode.node-1.gpu2`)."""
    return f"{TRANSCODE_QUEUE}.{node}.gpu{gpu}"


def worker_hostname(node: str, gpu: int | None) -> str:
    """Celery node name of a supervised worker: `gpujobs@node-1.gpu2`, `gpujobs@node-1.cpu`
    for the one CPU worker of `--gpus none`. Heartbeats list these names."""
    return f"gpujobs@{node}.{'cpu' if gpu is None else f'gpu{gpu}'}"


def broker_priority(priority: int) -> int:
    """Spec priority (0 lowest .. 9 most urgent) as the Redis transport's (0 is served first)."""
    return 9 - priority


def direct_queue(name: str) -> Queue:
    """A queue bound to its own direct exchange under its own name (Celery's plain routing)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_app(settings: Settings, broker_url: str) -> Celery:
    """The gpujobs Celery app bound to `broker_url` (the resolved broker, embedded or not)."""
    app = Celery("gpujobs", broker=broker_url, backend=settings.result_url or broker_url)
    app.conf.update(
        task_queues=[direct_queue(TRANSCODE_QUEUE), direct_queue(INFERENCE_QUEUE)],
        task_default_queue=TRANSCODE_QUEUE,
        task_routes={
            TRANSCODE_TASK: {"queue": TRANSCODE_QUEUE},
            INFERENCE_TASK: {"queue": INFERENCE_QUEUE},
        },
        # At-least-once delivery: ack after the job, requeue when the worker process dies,
        # and take one job at a time so a long transcode never holds a second one hostage.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Flower sees queued jobs (sent events) and running ones (task events).
        task_send_sent_event=True,
        worker_send_task_events=True,
        # No STARTED state in the result backend: the job record says running, Flower has the
        # task-started event, and that write ran before the task body, where a broker restart
        # made Celery fail the delivery and ack it, a queued job lost with no lease to recover.
        task_track_started=False,
        broker_transport_options={
            # Longer than the longest job: Redis would otherwise hand a running job to a
            # second worker when the timeout passes.
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": keys.PRIORITY_STEPS,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.connect_timeout_s,
        result_expires=settings.record_ttl_s,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def chunk_argsrepr(job_id: str, index: int, chunks: int, requests: int) -> str:
    """An inference chunk in one line, as Flower shows a task's arguments (index from 0, shown
    from 1): `batch 3f2a9c1b7d4e chunk 3/8: 50 requests`."""
    return f"batch {job_id} chunk {index + 1}/{chunks}: {requests} requests"


def task_argsrepr(spec: dict[str, Any]) -> str:
    """A transcode spec in one line, as Flower shows a task's arguments.

    `in/talk.mp4 -> in/talk.480p.mp4 | h264 480p p1 cq28 | audio copy | priority 5 | gpu auto`
    """
    size = (
        f"{spec.get('width')}x{spec.get('height')}"
        if spec.get("width")
        else (f"{spec.get('height')}p")
    )
    encode = f"{spec.get('codec', '?')} {size} {spec.get('preset', '?')} cq{spec.get('cq', '?')}"
    return " | ".join(
        [
            f"{spec.get('input', '?')} -> {spec.get('output', '?')}",
            encode,
            f"audio {spec.get('audio', '?')}",
            f"priority {spec.get('priority', '?')}",
            f"gpu {spec.get('gpu', '?')}",
        ]
    )
