"""Concurrency that follows the server (issue 14, part 3): workers/inference/adaptive.py.

Against a real HTTP server that queues as vLLM does (capacity C, the excess waiting) and
reports vLLM's /metrics, with the shared window in a real Valkey: the window comes down to the
server's capacity when requests wait, grows while nothing waits, is cut by 429s, and the
workers that send to one server split it between them. Speed is measured in
scripts/bench_inference.py, not here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import redis

from gpujobs import keys
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for
from tests.openai_server import FakeOpenAI
from workers.inference.adaptive import (
    AdaptiveConcurrency,
    ServerLoad,
    endpoint_id,
    parse_vllm_metrics,
    water_fill,
)
from workers.inference.client import BatchRequest, InferenceClient, Outcome, RetryPolicy

# /metrics as vLLM 0.x writes it: gauges per model and engine, among many other families.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 7.0
vllm:num_requests_running{engine="1",model_name="qwen"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 2.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 0.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="qwen"} 4.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="qwen"} 9.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="qwen"} 9.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="qwen"} 12.5
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_vllm_metrics_are_summed_over_engines() -> None:
    load = parse_vllm_metrics(VLLM_METRICS)
    assert (load.running, load.waiting) == (10.0, 2.0)
    assert parse_vllm_metrics("# nothing here\n") == parse_vllm_metrics("")
    assert parse_vllm_metrics("").waiting is None
    assert endpoint_id("http://h:9999/v1") == endpoint_id("http://h:9999/") != endpoint_id(
        "http://h:9998/v1")  # fmt: skip


def test_water_filling_gives_what_one_client_leaves_to_the_others() -> None:
    for window in (1, 7, 10, 33):
        for clients in (1, 2, 3, 5):
            parts = water_fill(window, [100] * clients)  # all want more than the window
            assert sum(parts) == window and max(parts) - min(parts) <= 1
    assert water_fill(10, [50]) == [10]  # alone: the whole window
    assert water_fill(11, [3, 40]) == [3, 8]  # one in its last requests: the other gets the rest
    assert water_fill(12, [40, 2, 5]) == [5, 2, 5]
    assert water_fill(10, [2, 3]) == [2, 3]  # nobody wants the rest
    assert water_fill(10, [0, 30]) == [0, 10]


def shared_clients(
    broker_url: str, count: int, endpoint: str, start: int = 10
) -> list[AdaptiveConcurrency]:
    """`count` clients of a made-up server's window, ticked by hand (no requests sent, so
    no HTTP session: load() is never called)."""
    shared = redis.Redis.from_url(broker_url, decode_responses=True)
    no_http = cast(aiohttp.ClientSession, None)
    return [AdaptiveConcurrency(shared, no_http, endpoint, start=start,
                                interval_s=1.0) for _ in range(count)]  # fmt: skip


def test_the_window_is_split_by_demand_and_a_part_waits_for_its_holder(broker_url: str) -> None:
    a, b = shared_clients(broker_url, 2, "http://split.invalid:1/v1")
    assert a.tick("keep", demand=-1) == 10  # alone: the whole window
    # b joins while a has 10 in flight: its part is 5, but a still holds all ten slots.
    assert b.tick("keep", demand=-1) == 0 and b.part == 5 and not b.settled
    assert a.tick("keep", demand=20, active=10) == a.part == 5  # a's share is cut; ten still run
    assert b.tick("keep", demand=20) == 0
    assert a.tick("keep", demand=20, active=5) == 5  # a's excess has drained: b may take its part
    assert b.tick("keep", demand=20, active=1) == 5 and b.settled
    assert a.tick("keep", demand=20, active=5) == 5 and a.settled
    # a in its last requests: what it does not need goes to b.
    assert a.tick("keep", demand=2, active=2) == 2 and not a.settled
    assert b.tick("keep", demand=20, active=5) == 8
    a.leave()  # a finished: b gets the whole window at its next tick
    assert b.tick("keep", demand=20, active=8) == 10 and b.settled
    assert b.clients == 1


def test_the_lua_split_matches_water_filling(broker_url: str) -> None:
    clients = shared_clients(broker_url, 3, "http://fill.invalid:1/v1", start=12)
    for demands in ([40, 2, 5], [1, 1, 30], [6, 6, 6], [0, 40, 40], [3, 4, 2]):
        shares = [0, 0, 0]
        for _ in range(3):  # each client lets go of what the new split takes from it
            for index, client in enumerate(clients):
                shares[index] = client.tick("keep", demand=demands[index], active=shares[index])
        assert sum(shares) <= 12
        expected = water_fill(12, demands)
        # Equal demands may get their parts in another order (ties go by token).
        assert sorted(zip(demands, shares, strict=True)) == sorted(
            zip(demands, expected, strict=True)), demands  # fmt: skip


def test_a_queue_sets_the_window_to_what_the_server_takes_and_probes_are_rare(
    broker_url: str,
) -> None:  # fmt: skip
    (client,) = shared_clients(broker_url, 1, "http://probe.invalid:1/v1")
    shared, key = client.redis, keys.endpoint_window(client.id)

    def steps_ago(field: str, steps: float) -> None:  # as if that change was `steps` ago
        seconds, micros = shared.time()
        shared.hset(key, field, seconds + micros / 1e6 - steps * client.interval_s)

    # 10 running and 4 waiting: the server takes 10. One waiting is a queue too (left there,
    # it would add its wait to every answer).
    client.window = 14
    assert client.decide(ServerLoad(running=10.0, waiting=4.0), True) == ("set", 10.0)
    assert client.decide(ServerLoad(running=10.0, waiting=1.0), True) == ("set", 10.0)
    assert client.tick("keep") == 10
    client.tick("set", 11.0)
    assert client.window == 10  # a smaller window stays, and 11 is the server's known size
    assert client.tick("dec") == 7  # a 429, say
    for expected in (8, 9, 10, 11):  # below the known size: +1 a step, however recent the cut
        steps_ago("changed", 1)
        assert client.tick("inc") == expected
    steps_ago("changed", 1)
    steps_ago("cut", 100)
    assert client.tick("inc") == 11  # at the known size: no probe yet
    steps_ago("changed", 41)
    assert client.tick("inc") == 12  # a probe, once 40 steps passed
    steps_ago("changed", 1)
    assert client.tick("inc") == 12
    # A reading one short (taken as a request left and the next was not yet let in) does not
    # lower the known size.
    assert client.tick("set", 9.0) == 11
    # A queue that lasts two steps after the window came down (clients not ours fill the
    # server) is cut by its excess, and the known size with it; a 429 cuts by a quarter.
    client.window = 11
    client._came_down = client._waiting_since = time.monotonic() - 3 * client.step_s
    assert client.decide(ServerLoad(running=10.0, waiting=4.0), True) == ("dec", 4.0)
    steps_ago("cut", 1)
    assert client.tick("dec", 3.0) == 8
    steps_ago("changed", 1)
    steps_ago("cut", 100)
    assert client.tick("inc") == 8  # 8 is the known size now: no probe yet
    client.answered(429, 0.1)
    assert client.decide(ServerLoad(None, None), True) == ("dec", 0.0)
    assert client.decide(ServerLoad(None, None), True) == ("inc", 0.0)
    assert client.tick("dec") == 6
    steps_ago("changed", 1)
    assert client.tick("inc") == 7  # back up to the known size at once


def chat(tag: str, index: int) -> BatchRequest:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": f"{tag}{index}"}]}
    return BatchRequest(index, f"{tag}{index}", "/v1/chat/completions", body)


class AdaptiveRun:
    """A client with its adaptive concurrency, sending `count` requests in its own thread and
    event loop (as a chunk in its own worker does)."""

    def __init__(self, server: FakeOpenAI, broker_url: str, tag: str, count: int, start: int):
        self.outcomes: list[Outcome] = []
        self.adaptive: AdaptiveConcurrency | None = None
        self.shares: list[int] = []
        self._args = (server, broker_url, tag, count, start)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._go()))

    async def _go(self) -> None:
        server, broker_url, tag, count, start = self._args
        retry = RetryPolicy(max_retries=20, backoff_s=0.02, backoff_max_s=0.1)
        async with InferenceClient(server.url, concurrency=start, retry=retry) as client:
            shared = redis.Redis.from_url(broker_url, decode_responses=True)
            self.adaptive = AdaptiveConcurrency(shared, client.http, server.url, start=start,
                                                interval_s=0.1)  # fmt: skip
            client.on_answer = self.adaptive.answered
            ticking = asyncio.create_task(self.adaptive.run(client.slots))

            def done(outcome: Outcome) -> None:
                self.outcomes.append(outcome)
                self.shares.append(client.slots.limit)

            try:
                await client.run([chat(tag, i) for i in range(count)], done)
            finally:
                ticking.cancel()
                await asyncio.gather(ticking, return_exceptions=True)

    def __enter__(self) -> AdaptiveRun:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.thread.join(timeout=120)


def window(broker_url: str, server: FakeOpenAI) -> int:
    """The server's shared window; a huge number before the first client made it."""
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    value = client.hget(keys.endpoint_window(endpoint_id(server.url)), "window")
    return int(value) if value else 1 << 30  # type: ignore[arg-type]


def waiting_samples(
    server: FakeOpenAI, stop: threading.Event, into: list[int], windows: list[int] | None = None,
    broker_url: str = "",
) -> None:  # fmt: skip
    while not stop.wait(0.05):
        into.append(server.waiting)
        if windows is not None:
            windows.append(window(broker_url, server))


def test_a_window_too_large_comes_down_to_the_servers_capacity(broker_url: str) -> None:
    # Two clients start with a window of 16 on a server that runs 4 at once: 12 wait. (A
    # request takes 0.1 s: long enough that clients slowed by a busy machine still queue.)
    with FakeOpenAI(latency_s=0.1, capacity=4, queue=True) as server:
        waiting: list[int] = []
        windows: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=waiting_samples,
                                   args=(server, stop, waiting, windows, broker_url))  # fmt: skip
        sampler.start()
        with AdaptiveRun(server, broker_url, "a", 300, 16), AdaptiveRun(
            server, broker_url, "b", 300, 16
        ):  # fmt: skip
            wait_for(lambda: window(broker_url, server) <= 5, timeout_s=60)
            settled = len(waiting)
        stop.set()
        sampler.join()
        assert all(count == 1 for count in server.served().values())
        assert len(server.served()) == 600
    # The queue was there at first (counted by the server as requests arrive: a sampler on a
    # busy machine can miss it).
    assert server.peak_waiting >= 4, waiting[:settled]
    # Once down, the window stays near the capacity: it grows by one, finds requests
    # waiting, and comes back.
    after = sorted(windows[settled:-1] or [window(broker_url, server)])
    assert 3 <= after[len(after) // 2] <= 6, after


def test_a_window_too_small_grows_while_nothing_waits(broker_url: str) -> None:
    with FakeOpenAI(latency_s=0.02, capacity=6, queue=True) as server:
        with AdaptiveRun(server, broker_url, "a", 2000, 1) as run:
            wait_for(lambda: 6 <= window(broker_url, server) < 1 << 30, timeout_s=60)
            seen = max(run.shares or [1])
        assert all(not outcome.failed for outcome in run.outcomes)
    assert seen >= 1


def test_429s_cut_the_window_and_every_request_still_succeeds(broker_url: str) -> None:
    # A server that refuses what is over its capacity (3) instead of queueing it, and has no
    # /metrics: 429 is the only signal.
    with FakeOpenAI(latency_s=0.02, capacity=3, retry_after_s=None) as server:
        with AdaptiveRun(server, broker_url, "a", 400, 12) as run:
            wait_for(lambda: window(broker_url, server) <= 4, timeout_s=60)
        assert server.entries("rejected")
        assert len(run.outcomes) == 400 and all(not o.failed for o in run.outcomes)


def test_two_workers_on_one_server_split_one_window(
    client: Client, settings: Settings, broker_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    env = {"GPUJOBS_INFERENCE_BACKOFF_S": "0.02", "GPUJOBS_INFERENCE_BACKOFF_MAX_S": "0.2"}
    with FakeOpenAI(latency_s=0.02, capacity=6, queue=True) as server:
        for name in ("a@test", "b@test"):
            start_worker("--queues", "inference", "--hostname", name, env=env)
        rows = [[{"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "fake-model",
                           "messages": [{"role": "user", "content": f"{tag}{i}"}]}}
                 for i in range(1500)] for tag in "ab"]  # fmt: skip
        jobs = [client.submit_inference(r, endpoint=server.url, max_concurrency=6) for r in rows]
        members = keys.endpoint_clients(endpoint_id(server.url))
        # Both chunks are registered as clients of the one window while they run.
        wait_for(lambda: client.redis.zcard(members) == 2, timeout_s=60)
        records = [job.wait(timeout=120) for job in jobs]
        assert all(record.state is JobState.SUCCEEDED for record in records)
        assert len(server.served()) == 3000 and set(server.served().values()) == {1}
    # Each chunk left the window when it finished.
    wait_for(lambda: client.redis.zcard(members) == 0, timeout_s=10)
