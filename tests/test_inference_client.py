"""The batch HTTP client against a real HTTP server that speaks the OpenAI routes.

No Redis, no Celery: workers/inference/client.py alone, with its retries, its concurrency bound,
errors as vLLM writes them, the server check and local images sent inline.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.openai_server import FakeOpenAI
from workers.inference.client import (
    BatchRequest,
    InferenceClient,
    Outcome,
    RetryPolicy,
    ServerUnavailable,
    Slots,
    error_from_body,
    retry_after_s,
)

FAST_RETRY = RetryPolicy(max_retries=3, backoff_s=0.01, backoff_max_s=0.05)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency_s=0.01, capacity=4) as fake:
        yield fake


def chat(index: int, text: str, **body: Any) -> BatchRequest:
    messages = [{"role": "user", "content": text}]
    return BatchRequest(index, f"c{index}", "/v1/chat/completions",
                        {"model": "fake-model", "messages": messages, **body})  # fmt: skip


def run(client_kwargs: dict[str, Any], requests: list[BatchRequest],
        endpoint: str) -> dict[str, Outcome]:  # fmt: skip
    outcomes: dict[str, Outcome] = {}

    async def go() -> None:
        async with InferenceClient(endpoint, **client_kwargs) as client:
            await client.run(requests, lambda o: outcomes.__setitem__(o.custom_id, o))

    asyncio.run(go())
    return outcomes


def test_retries_transient_failures_and_reports_permanent_ones(server: FakeOpenAI) -> None:
    requests = [chat(i, f"q{i}") for i in range(40)]
    server.faults = {"q3": [500, 429], "q5": ["disconnect"], "q6": [503, 502, 504]}
    server.permanent = {"q7": 400, "q9": 500}
    outcomes = run({"concurrency": 4, "retry": FAST_RETRY}, requests, server.url)

    assert sorted(outcomes) == sorted(r.custom_id for r in requests)
    ok = [o for o in outcomes.values() if not o.failed]
    assert len(ok) == 38
    for cid in ("c3", "c5", "c6"):
        line = outcomes[cid].line
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"].startswith("echo")
    bad = outcomes["c7"].line  # a 400 is not retried: it fails alone, at once
    assert bad["response"]["status_code"] == 400
    assert bad["error"] == {"code": "400", "message": "injected 400 for q7"}
    assert [e.key for e in server.entries()].count("q7") == 1
    gave_up = outcomes["c9"].line  # retried max_retries times, then reported
    assert gave_up["response"]["status_code"] == 500 and gave_up["error"]["code"] == "500"
    assert [e.key for e in server.entries()].count("q9") == 1 + FAST_RETRY.max_retries
    assert server.served().get("q3") == 1 and server.served().get("q6") == 1
    # The client never had more in flight than the server takes: nothing was refused.
    assert server.entries("rejected") == [] and server.peak <= 4
    assert outcomes["c0"].usage == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    assert outcomes["c0"].line["response"]["request_id"].startswith("req-")


def test_concurrency_is_the_bound_and_is_used(server: FakeOpenAI) -> None:
    server.latency_s = 0.05
    server.capacity, server.enforce = 100, False  # count what the client does, refuse nothing
    requests = [chat(i, f"q{i}") for i in range(30)]
    run({"concurrency": 6, "retry": FAST_RETRY}, requests, server.url)
    assert server.peak == 6


def test_retry_after_is_honoured(server: FakeOpenAI) -> None:
    server.retry_after_s = 0.4
    server.faults = {"slow": [429]}
    run({"retry": RetryPolicy(max_retries=2, backoff_s=0.01, backoff_max_s=5)},
        [chat(0, "slow")], server.url)  # fmt: skip
    first, second = (e.started for e in server.entries() if e.key == "slow")
    assert second - first >= 0.4


def test_retry_after_forms() -> None:
    from multidict import CIMultiDict

    assert retry_after_s(CIMultiDict({"Retry-After": "2"})) == 2.0
    assert retry_after_s(CIMultiDict({"Retry-After": "0.25"})) == 0.25
    assert retry_after_s(CIMultiDict({})) is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (retry_after_s(CIMultiDict({"Retry-After": later})) or 0) <= 31


def test_vllm_error_shapes() -> None:
    nested = {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                        "param": None, "code": 400}}  # fmt: skip
    flat = {"object": "error", "message": "model not found", "type": "NotFoundError", "code": 404}
    assert error_from_body(400, nested) == {"code": "400", "message": "max_tokens is too large"}
    assert error_from_body(404, flat) == {"code": "404", "message": "model not found"}
    assert error_from_body(502, "<html>Bad Gateway</html>") == {
        "code": "502", "message": "<html>Bad Gateway</html>"}  # fmt: skip


def test_unknown_model_is_that_requests_error(server: FakeOpenAI) -> None:
    outcomes = run({"retry": FAST_RETRY}, [chat(0, "a", model="nope"), chat(1, "b")], server.url)
    assert outcomes["c0"].failed and outcomes["c0"].line["response"]["status_code"] == 404
    assert "does not exist" in outcomes["c0"].line["error"]["message"]
    assert not outcomes["c1"].failed


def test_model_defaults_to_the_servers_only_one_and_override_wins(server: FakeOpenAI) -> None:
    bare = BatchRequest(0, "e0", "/v1/embeddings", {"input": "hello"})
    outcomes = run({"retry": FAST_RETRY}, [bare], server.url)
    assert not outcomes["e0"].failed
    assert outcomes["e0"].line["response"]["body"]["data"][0]["object"] == "embedding"
    assert server.entries()[-1].model == "fake-model"
    server.models = ("fake-model", "other")
    run({"retry": FAST_RETRY, "model": "other"}, [chat(1, "x", model="fake-model")], server.url)
    assert server.entries()[-1].model == "other"
    # Two models and none named: that request fails with a reason, the server is not asked.
    outcomes = run({"retry": FAST_RETRY}, [BatchRequest(2, "e2", "/v1/completions",
                                                        {"prompt": "p"})], server.url)  # fmt: skip
    assert outcomes["e2"].line["error"]["code"] == "model_required"


def test_server_wait_fails_with_the_reason() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go() -> None:
        async with InferenceClient(f"http://127.0.0.1:{port}/v1") as client:
            await client.wait_for_server(0.3, poll_s=0.1)

    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"did not come up in 0.3 s: .*refused"):
        asyncio.run(go())
    assert time.monotonic() - started < 15


def test_server_wait_sees_a_loading_server_come_up(server: FakeOpenAI) -> None:
    server.healthy = False

    async def go() -> None:
        async with InferenceClient(server.url) as client:
            assert await client.probe() == f"{server.root}/health answered HTTP 503"
            asyncio.get_running_loop().call_later(0.2, setattr, server, "healthy", True)
            await client.wait_for_server(5, poll_s=0.05)

    asyncio.run(go())


def test_a_server_that_is_not_there_pauses_requests_then_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"went away and did not come back in 0.5 s: "
                       "connection refused"):  # fmt: skip
        run({"retry": RetryPolicy(max_retries=1, backoff_s=0.01), "server_wait_s": 0.5},
            [chat(0, "x")], f"http://127.0.0.1:{port}/v1")  # fmt: skip
    assert time.monotonic() - started < 10


def test_local_images_are_sent_inline(server: FakeOpenAI, tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "img").mkdir(parents=True)
    (media / "img" / "dot.png").write_bytes(PNG)
    (media / "img" / "noext").write_bytes(PNG)
    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "img/dot.png"}},
        {"type": "image_url", "image_url": {"url": f"file://{media}/img/noext"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    request = BatchRequest(0, "v0", "/v1/chat/completions",
                           {"model": "fake-model", "messages": [{"role": "user",
                                                                 "content": content}]})  # fmt: skip

    def resolve(path: str) -> Path:
        return (media / path).resolve()

    outcomes = run({"retry": FAST_RETRY, "resolve_image": resolve}, [request], server.url)
    assert not outcomes["v0"].failed
    inline = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert server.entries()[-1].images == [inline, inline, "https://example.com/cat.jpg"]
    assert content[1]["image_url"]["url"] == "img/dot.png"  # the request itself is untouched
    (media / "img" / "dot.png").unlink()  # gone since the batch was checked: that request fails
    outcomes = run({"retry": FAST_RETRY, "resolve_image": resolve}, [request], server.url)
    assert outcomes["v0"].line["error"]["code"] == "invalid_image"


def test_stop_abandons_what_is_in_flight(server: FakeOpenAI) -> None:
    server.latency_s = 0.2
    requests = [chat(i, f"q{i}") for i in range(40)]
    seen: list[Outcome] = []

    async def go() -> str | None:
        async with InferenceClient(server.url, concurrency=4) as client:
            return await client.run(requests, seen.append,
                                    should_stop=lambda: "cancelled" if seen else None,
                                    stop_poll_s=0.05)  # fmt: skip

    started = time.monotonic()
    assert asyncio.run(go()) == "cancelled"
    assert time.monotonic() - started < 10 and 1 <= len(seen) < 40


def test_retry_after_as_a_gmt_date_written_minus_0000(monkeypatch: pytest.MonkeyPatch) -> None:
    from multidict import CIMultiDict

    # RFC 5322's "-0000" is GMT too; Python parses it as a naive time, which is not local time.
    later = time.strftime("%a, %d %b %Y %H:%M:%S -0000", time.gmtime(time.time() + 30))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert 25 <= (retry_after_s(CIMultiDict({"Retry-After": later})) or 0) <= 31
    finally:
        monkeypatch.undo()
        time.tzset()


def test_requests_are_taken_as_slots_free_not_all_at_once(server: FakeOpenAI) -> None:
    # A chunk of 100 vision requests must not read and inline 100 images before sending one.
    taken: list[int] = []
    taken_at_first_outcome: list[int] = []

    def requests() -> Iterator[BatchRequest]:
        for i in range(100):
            taken.append(i)
            yield chat(i, f"q{i}")

    def on_outcome(outcome: Outcome) -> None:
        taken_at_first_outcome.append(len(taken))

    async def go() -> None:
        async with InferenceClient(server.url, concurrency=4, retry=FAST_RETRY) as client:
            await client.run(requests(), on_outcome)

    asyncio.run(go())
    assert len(taken_at_first_outcome) == 100 and taken_at_first_outcome[0] <= 8
    assert server.entries("rejected") == [] and server.peak <= 4


def test_a_body_that_cannot_be_sent_fails_alone_naming_its_field(server: FakeOpenAI) -> None:
    requests = [
        chat(0, "fine"),
        chat(1, "nan", temperature=float("nan")),
        chat(2, "lone \ud83d surrogate"),
        chat(3, "no JSON type", seed={1, 2}),
    ]
    outcomes = run({"retry": FAST_RETRY}, requests, server.url)
    assert not outcomes["c0"].failed
    for name, field in (("c1", "temperature"), ("c2", "messages[0].content"), ("c3", "seed")):
        error = outcomes[name].line["error"]
        assert outcomes[name].failed and error["code"] == "invalid_request", error
        assert field in error["message"], error
    assert [entry.key for entry in server.log] == ["fine"]


def test_slots_bound_in_flight_hand_over_in_order_and_survive_cancelled_waiters() -> None:
    async def go() -> tuple[list[int], int, int]:
        slots = Slots(2)
        entered: list[int] = []
        gates = {i: asyncio.Event() for i in range(6)}

        async def one(i: int) -> None:
            async with slots:
                entered.append(i)
                await gates[i].wait()

        tasks = {i: asyncio.create_task(one(i)) for i in range(6)}
        while len(entered) < 2:
            await asyncio.sleep(0)
        assert entered == [0, 1] and slots.saturated  # 2..5 wait
        tasks[2].cancel()  # a waiter cancelled: its place is not lost, nor handed a slot
        await asyncio.gather(tasks[2], return_exceptions=True)
        assert (slots.active, slots.waiting, slots.demand) == (2, 3, 5)
        await slots.set_limit(1)
        gates[0].set()  # 0 leaves; at limit 1 with 1 still in, nobody enters
        await tasks[0]
        peak_low = slots.active
        await slots.set_limit(3)  # 3 and 4 enter at once, in order
        while len(entered) < 4:
            await asyncio.sleep(0)
        for i in (1, 3, 4, 5):
            gates[i].set()
        await asyncio.gather(*(tasks[i] for i in (1, 3, 4, 5)))
        return entered, peak_low, slots.active

    entered, peak_low, active = asyncio.run(go())
    assert entered == [0, 1, 3, 4, 5]
    assert peak_low == 1
    assert active == 0
