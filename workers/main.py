"""Starting a Celery worker process for gpujobs."""

from __future__ import annotations

import logging

from gpujobs.app import make_app
from gpujobs.config import Settings
from gpujobs.connection import broker_url
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
    app.worker_main(
        argv=[
            "worker",
            "--queues", ",".join(queues),
            "--concurrency", str(concurrency),
            "--pool", "prefork",
            "--hostname", hostname or f"gpujobs@{settings.node_name}",
            "--loglevel", loglevel,
            "--without-gossip",  # peers learn nothing from gossip we use; it only costs traffic
            "--without-mingle",  # start faster: revoked ids live in our job records instead
        ]
    )  # fmt: skip
