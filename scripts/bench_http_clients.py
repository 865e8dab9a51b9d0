"""Benchmark: the CPU an HTTP client spends per chat request, against a real OpenAI-compatible
server, for the clients the batch sender could use. Why workers/inference/transport.py is aiohttp.

Each client sends N chat completions (max_tokens 16) at concurrency C with an
asyncio.Semaphore(C), in a process of its own (so one's imports and pools do not help another),
clients alternating round by round. Per run: requests/s, and the process's CPU time (user +
system) over the run divided by N, imports left out. Medians of the runs.

- aiohttp: a ClientSession, the body encoded once per request, the answer parsed with json;
- httpx: an AsyncClient (what the batch client used before), the same;
- httpx2: the `openai` package's HTTP library, the same;
- openai: the `openai` package's AsyncOpenAI, default client (httpx2);
- gpujobs: workers/inference/client.py's InferenceClient.run at C (aiohttp, retries, slots).

    scripts/vllm-dev.sh start
    .venv/bin/python scripts/bench_http_clients.py --url http://127.0.0.1:8011/v1 \
        --model tiny-chat --requests 600 --concurrency 10 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLIENTS = ("aiohttp", "httpx", "httpx2", "openai", "gpujobs")


def body(model: str, index: int) -> dict[str, Any]:
    prompt = f"Say something about number {index}."
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}


async def send_all(client: str, url: str, model: str, n: int, concurrency: int) -> int:
    """Send n requests with `client`; the number that failed."""
    route = f"{url}/chat/completions"
    headers = {"Content-Type": "application/json"}
    slots = asyncio.Semaphore(concurrency)
    failed = 0

    if client == "gpujobs":
        from workers.inference.client import BatchRequest, InferenceClient, Outcome

        done: list[Outcome] = []
        requests = (BatchRequest(i, f"r{i}", "/v1/chat/completions", body(model, i))
                    for i in range(n))  # fmt: skip
        async with InferenceClient(url, concurrency=concurrency) as sender:
            await sender.run(requests, done.append)
        return sum(o.failed for o in done)
    if client == "openai":
        from openai import AsyncOpenAI

        oa = AsyncOpenAI(base_url=url, api_key="unused")

        async def one_openai(i: int) -> None:
            nonlocal failed
            async with slots:
                try:
                    await oa.chat.completions.create(**body(model, i))
                except Exception:
                    failed += 1

        await asyncio.gather(*(one_openai(i) for i in range(n)))
        await oa.close()
        return failed
    if client == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession() as session:

            async def one_aiohttp(i: int) -> None:
                nonlocal failed
                async with slots:
                    data = json.dumps(body(model, i)).encode()
                    async with session.post(route, data=data, headers=headers) as answer:
                        json.loads(await answer.read())
                        failed += answer.status != 200

            await asyncio.gather(*(one_aiohttp(i) for i in range(n)))
        return failed
    module: Any = __import__(client)  # httpx or httpx2: the same API
    async with module.AsyncClient(timeout=60) as http:

        async def one_httpx(i: int) -> None:
            nonlocal failed
            async with slots:
                data = json.dumps(body(model, i)).encode()
                answer = await http.post(route, content=data, headers=headers)
                json.loads(answer.content)
                failed += answer.status_code != 200

        await asyncio.gather(*(one_httpx(i) for i in range(n)))
    return failed


def child(client: str, url: str, model: str, n: int, concurrency: int) -> None:
    """One measured run in this process: prints `rate cpu_us failed` as JSON."""
    import aiohttp  # noqa: F401  (imports before the clock starts)
    import httpx  # noqa: F401
    import httpx2  # noqa: F401
    import openai  # noqa: F401

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import workers.inference.client  # noqa: F401

    began, cpu = time.perf_counter(), time.process_time()
    failed = asyncio.run(send_all(client, url, model, n, concurrency))
    took, used = time.perf_counter() - began, time.process_time() - cpu
    print(json.dumps([n / took, used / n * 1e6, failed]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8011/v1")
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.model, args.requests, args.concurrency)
        return
    results: dict[str, list[list[float]]] = {name: [] for name in CLIENTS}
    for round_ in range(args.runs):
        for name in CLIENTS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, "--url", args.url, "--model",
                 args.model, "--requests", str(args.requests), "--concurrency",
                 str(args.concurrency)], capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"error: {name}: {done.stderr.strip().splitlines()[-1:]}")
            rate, cpu_us, failed = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append([rate, cpu_us, failed])
            print(f"round {round_ + 1} {name}: {rate:.1f} requests/s, {cpu_us:.0f} µs CPU per "
                  f"request, {failed:.0f} failed", flush=True)  # fmt: skip
    print()
    print(f"{args.url} ({args.model}), N = {args.requests}, C = {args.concurrency}, "
          f"median of {args.runs} runs")  # fmt: skip
    print()
    print("| client | requests/s | CPU per request | CPU of httpx's | failures |")
    print("|---|---:|---:|---:|---:|")
    httpx_cpu = statistics.median(r[1] for r in results["httpx"])
    for name, runs in results.items():
        cpu = statistics.median(r[1] for r in runs)
        print(f"| {name} | {statistics.median(r[0] for r in runs):.1f} | {cpu:.0f} µs | "
              f"{cpu / httpx_cpu:.2f} | {sum(r[2] for r in runs):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
