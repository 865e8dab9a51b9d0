"""Starting a Celery worker process for gpujobs."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from celery.worker import state as worker_state

from gpujobs.app import GPU_TRANSCODE_QUEUE, TRANSCODE_QUEUE, make_app, node_queue
from gpujobs.config import Settings
from gpujobs.connection import broker_url
from gpujobs.errors import GpujobsError
from workers import heartbeat
from workers.lost_deliveries import keep_deliveries_when_the_connection_is_gone
from workers.recovery import Watchdog, drain_on_shutdown
from workers.runtime import runtime
from workers.tasks import register_tasks

DEFAULT_QUEUES = ("transcode", "inference")


def run_worker(
    queues: list[str],
    concurrency: int = 1,
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker (prefork pool) until it is told to stop. Blocks.

    concurrency: jobs at once in this process's pool (default 1: one transcode per GPU process).
    """
    settings = Settings()
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(settings, broker_url(settings, start_local=False))
    register_tasks(app)
    install_recovery(app, settings)
    keep_deliveries_when_the_connection_is_gone()
    name = hostname or f"gpujobs@{settings.node_name}"
    heartbeat.attach(name)  # the node's heartbeat, or reports to this worker's supervisor
    gpu = TRANSCODE_QUEUE in queues and has_gpu(settings)
    app.worker_main(
        argv=[
            "worker",
            "--queues", ",".join(with_node_queue(queues, settings.node_name, gpu)),
            "--concurrency", str(concurrency),
            "--pool", "prefork",
            "--hostname", name,
            "--loglevel", loglevel,
            "--without-gossip",  # peers learn nothing from gossip we use; it only costs traffic
            "--without-mingle",  # start faster: revoked ids live in our job records instead
        ]
    )  # fmt: skip


def with_node_queue(queues: list[str], node: str, gpu: bool = False) -> list[str]:
    """A transcode worker also consumes its node's queue, so `submit --node` reaches it, and,
    when it has a GPU (`gpu`), the queue of the jobs that require one (`--gpu require`)."""
    if TRANSCODE_QUEUE not in queues:
        return list(queues)
    extra = [node_queue(node), *([GPU_TRANSCODE_QUEUE] if gpu else [])]
    return [*queues, *(q for q in extra if q not in queues)]


def has_gpu(settings: Settings) -> bool:
    """Whether this worker has a GPU, as its heartbeat says (measured once per process)."""
    from workers.gpu.discovery import detect_capabilities

    return detect_capabilities(settings.ffmpeg_binary()).has_gpu


def install_recovery(app: Celery, settings: Settings) -> None:
    """In the worker's main process: the lease watchdog, and requeue-on-shutdown (SIGTERM)."""

    @signals.worker_ready.connect(weak=False)
    def start_watchdog(**kwargs: Any) -> None:
        try:
            store = runtime().store
        except GpujobsError as exc:  # Celery got through but we did not: say so, run on
            logging.getLogger(__name__).error("no lease watchdog in this worker: %s", exc)
            return
        Watchdog(store, app, settings.watchdog_interval_s, settings.max_attempts).start()

    @signals.worker_shutting_down.connect(weak=False)
    def drain(sender: str, **kwargs: Any) -> None:
        # Celery's warm shutdown waits for running jobs; we bound that wait by requeueing them
        # after the grace period, so they restart elsewhere at once instead of being killed
        # with the pod and waiting out their lease.
        try:
            store = runtime().store
        except GpujobsError as exc:  # never connected: nothing of ours can be running
            logging.getLogger(__name__).warning("no requeue on shutdown: %s", exc)
            return
        drain_on_shutdown(
            store,
            app,
            running_job_ids=lambda: [request.id for request in list(worker_state.active_requests)],
            worker=sender,
            grace_s=settings.shutdown_grace_s,
        )
