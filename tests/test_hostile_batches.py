"""Batch inference under hostile input and misbehaving servers (issue 15): no job ever hangs,
no line is lost.

One test per kind: the input is made in the test; the servers misbehave on purpose
(tests/openai_server.py: never answer, trickle, close early, answer bytes that are not JSON,
escapes that are no Unicode, NaN, a stream, go away and come back).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpujobs import InvalidSpec
from gpujobs.batch import BATCHES, enqueue_batches, prepare_batch
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import InferenceSpec, JobState
from tests.helpers import WorkerProcess, wait_for
from tests.openai_server import FakeOpenAI
from workers.inference.client import (
    BatchRequest,
    InferenceClient,
    Outcome,
    RetryPolicy,
    safe_line,
)

FAST = {"GPUJOBS_INFERENCE_BACKOFF_S": "0.02", "GPUJOBS_INFERENCE_BACKOFF_MAX_S": "0.2"}
QUICK = RetryPolicy(max_retries=2, backoff_s=0.01, backoff_max_s=0.05)


def request(custom_id: str, text: str = "hi", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "fake-model", "messages": messages, **body}}  # fmt: skip


def good_lines(count: int) -> list[str]:
    return [json.dumps(request(f"r{i}", f"q{i}")) for i in range(count)]


def gpujobs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "COLUMNS": "200"}, check=False,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command prints; it must be that line alone, with no traceback."""
    assert result.returncode != 0, result.stdout
    [message] = result.stderr.strip().splitlines()
    assert message.startswith("error: "), message
    return message.removeprefix("error: ")


def nothing_queued(client: Client, settings: Settings) -> None:
    assert client.list() == []
    assert not (settings.media / BATCHES).exists() or not any((settings.media / BATCHES).iterdir())
    assert client.redis.llen("inference") == 0


# --- input rows -------------------------------------------------------------------------------


def test_lone_surrogates_are_refused_at_the_check_and_nothing_is_queued(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(good_lines(3)) + "\n")
    bad = tmp_path / "bad.jsonl"
    # Legal JSON text ("\ud83d" is a valid escape), yet no UTF-8 can hold it: in a value, in a
    # key, in a custom_id, deep in a list.
    for text, field in [
        (r'"content": "smile \ud83d"', r"body.messages[0].content holds a lone UTF-16 "
                                       r"surrogate (\ud83d) at character 7"),
        (r'"content": "x", "\udc00k": 1', r"key '\udc00k' holds a lone UTF-16 surrogate"),
    ]:  # fmt: skip
        line = ('{"custom_id": "b1", "method": "POST", "url": "/v1/chat/completions", "body": '
                '{"model": "m", "messages": [{"role": "user", ' + text + "}]}}")  # fmt: skip
        bad.write_text("\n".join([*good_lines(1), line]) + "\n")
        # Two files: the first is fine, the second is not; neither is queued.
        message = refused(gpujobs("infer", str(good), str(bad), "--endpoint", "http://h:1/v1"))
        assert message.startswith("line 2: ") and field in message, message
        nothing_queued(client, settings)
    bad.write_text('{"custom_id": "\\ud800", "method": "POST", "url": "/v1/embeddings", '
                   '"body": {"input": "x"}}\n')  # fmt: skip
    assert "custom_id holds a lone UTF-16 surrogate" in refused(gpujobs("infer", str(bad)))
    with pytest.raises(InvalidSpec, match=r"item 1: body\.input\[1\] holds a lone UTF-16"):
        client.submit_inference([{**request("s"), "url": "/v1/embeddings",
                                  "body": {"input": ["ok", "x\udfff"]}}])  # fmt: skip
    nothing_queued(client, settings)


def test_all_or_none_holds_when_a_file_changes_between_its_check_and_its_queueing(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    first = tmp_path / "first.jsonl"
    second = tmp_path / "second.jsonl"
    first.write_text("\n".join(good_lines(3)) + "\n")
    second.write_text("\n".join(good_lines(2)) + "\n")
    prepared = [prepare_batch(settings, path, endpoint="http://h:1/v1") for path in (first, second)]
    second.write_text('{"custom_id": "r0", "method": "POST", "url": "/v1/completions", '
                      '"body": {"prompt": "\\udead"}}\n')  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"line 1: body\.prompt holds a lone UTF-16 surrogate"):
        enqueue_batches(prepared, settings=settings, store=client.store, app=client.app)
    nothing_queued(client, settings)


def test_numbers_json_has_not_are_refused_naming_line_and_field(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    cases = {
        '"temperature": NaN': "body.temperature is NaN",
        '"top_p": Infinity': "body.top_p is Infinity",
        '"logit_bias": {"50256": -Infinity}': "body.logit_bias.50256 is -Infinity",
        '"seed": 1e999': "body.seed is Infinity",  # valid JSON text, out of any float's range
    }
    batch = tmp_path / "nan.jsonl"
    for text, field in cases.items():
        line = ('{"custom_id": "n", "method": "POST", "url": "/v1/completions", "body": '
                '{"prompt": "x", ' + text + "}}")  # fmt: skip
        batch.write_text("\n".join([*good_lines(2), line]) + "\n")
        message = refused(gpujobs("infer", str(batch)))
        assert message.startswith(f"line 3: {field}, which is not a JSON number"), message
    # What Python's json.dumps writes by default, given to the SDK.
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidSpec, match=r"item 2: body\.temperature is (NaN|Infinity)"):
            client.submit_inference([request("a"), request("b", temperature=value)])
    nothing_queued(client, settings)


def test_a_request_that_asks_to_stream_is_refused(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    batch = tmp_path / "stream.jsonl"
    for flag, shown in ((True, "true"), ("yes", '"yes"'), (1, "1")):
        batch.write_text(json.dumps(request("s", stream=flag)) + "\n")
        assert refused(gpujobs("infer", str(batch))) == (
            f"line 1: a batch request must not stream (body.stream is {shown}); drop it: each "
            "line gets one whole answer"
        )
    nothing_queued(client, settings)
    batch.write_text(json.dumps(request("s", stream=False)) + "\n")  # false is no stream
    assert prepare_batch(settings, batch).spec.requests == 1


def test_a_route_given_as_the_endpoint_is_refused_naming_the_base_url(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(good_lines(2)) + "\n")
    for given, route, base in [
        ("http://gpu1:9999/v1/chat/completions", "/chat/completions", "http://gpu1:9999/v1"),
        ("http://gpu1:9999/v1/embeddings/", "/embeddings", "http://gpu1:9999/v1"),
        ("http://gpu1:9999/v1/models", "/models", "http://gpu1:9999/v1"),
        ("https://gw/vllm/completions", "/completions", "https://gw/vllm"),
    ]:
        message = refused(gpujobs("infer", str(batch), "--endpoint", given))
        assert f"names a route ({route}), not the server's base URL: give '{base}'" in message
    nothing_queued(client, settings)


def test_a_server_check_names_the_url_it_tried(server: FakeOpenAI) -> None:
    async def go() -> str | None:
        # /other/health and /other/v1/models: neither is served there.
        async with InferenceClient(f"{server.root}/other/v1") as http:
            return await http.probe()

    assert asyncio.run(go()) == f"{server.root}/other/v1/models answered HTTP 404"


def test_byte_order_marks_are_not_content_and_utf16_is_named(
    settings: Settings, tmp_path: Path
) -> None:
    batch = tmp_path / "bom.jsonl"
    lines = good_lines(4)
    # A Windows editor's BOM at the start, and another where a second file was appended.
    text = "\ufeff" + "\n".join(lines[:2]) + "\r\n\ufeff" + "\r\n".join(lines[2:]) + "\r\n"
    batch.write_bytes(text.encode("utf-8"))
    assert prepare_batch(settings, batch).spec.requests == 4
    batch.write_bytes("\n".join(lines).encode("utf-16"))
    assert refused(gpujobs("infer", str(batch))) == (
        f"batch file {batch} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it "
        "as UTF-8"
    )


def test_a_line_cut_off_is_named_at_the_column_where_it_breaks(tmp_path: Path) -> None:
    whole = json.dumps(request("c", "a long enough prompt"))
    batch = tmp_path / "cut.jsonl"
    for cut in (len(whole) - 1, len(whole) // 2, 30, 45):  # inside strings and between values
        batch.write_text("\n".join([*good_lines(2), whole[:cut]]) + "\n")
        message = refused(gpujobs("infer", str(batch)))
        assert message.startswith(f"line 3: not valid JSON: the line is cut off at column "
                                  f"{cut + 1} ("), message  # fmt: skip
    batch.write_text('{"custom_id": "x",, "method": "POST"}\n')  # broken inside: where it breaks
    assert refused(gpujobs("infer", str(batch))) == (
        "line 1: not valid JSON (Expecting property name enclosed in double quotes at column 19)"
    )


# --- server rows ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency_s=0.01, capacity=8) as fake:
        yield fake


def send(server: FakeOpenAI, requests: list[BatchRequest], **kwargs: Any) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}

    async def go() -> None:
        async with InferenceClient(server.url, **{"retry": QUICK, **kwargs}) as http:
            await http.run(requests, lambda o: outcomes.__setitem__(o.custom_id, o))

    asyncio.run(go())
    return outcomes


def chat(index: int, text: str) -> BatchRequest:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    return BatchRequest(index, f"c{index}", "/v1/chat/completions", body)


def test_a_server_that_never_answers_or_trickles_times_out_naming_limit_and_tries(
    server: FakeOpenAI,
) -> None:
    server.permanent = {"hang": "hang", "slow": "trickle"}
    started = time.monotonic()
    outcomes = send(server, [chat(0, "hang"), chat(1, "slow"), chat(2, "fine")], timeout_s=1.5)
    for cid in ("c0", "c1"):  # trickling bytes resets no clock: the limit is for the answer
        error = outcomes[cid].line["error"]
        assert error == {"code": "timeout", "message": "no answer within the request timeout "
                         "(1.5 s), 3 tries"}, error  # fmt: skip
    assert not outcomes["c2"].failed
    assert time.monotonic() - started < 20
    assert [e.key for e in server.entries()].count("hang") == 3


def test_answers_that_are_broken_fail_alone_and_every_line_stays_utf8_json(
    server: FakeOpenAI,
) -> None:
    server.faults = {"cut": ["truncate"], "gone": ["disconnect", "disconnect"]}
    server.permanent = {"junk": "garbage", "nan": "nan", "sse": "sse", "half": "surrogate",
                        "closes": "disconnect"}  # fmt: skip
    keys = ["cut", "gone", "junk", "nan", "sse", "half", "closes", "fine"]
    outcomes = send(server, [chat(i, key) for i, key in enumerate(keys)])
    by_key = {key: outcomes[f"c{i}"] for i, key in enumerate(keys)}
    for key in ("cut", "gone", "fine"):  # closed early, then answered on a retry
        assert not by_key[key].failed, by_key[key].line
    junk = by_key["junk"].line
    assert junk["error"]["code"] == "invalid_response"
    assert junk["error"]["message"].startswith("the server's answer is not JSON (")
    assert by_key["nan"].line["error"]["message"].startswith("the server's answer is not "
                                                             "standard JSON (NaN")  # fmt: skip
    assert by_key["sse"].line["error"]["message"].startswith("the server streamed its answer")
    half = by_key["half"].line  # kept, with the broken escape replaced, and said so nowhere else
    assert not by_key["half"].failed
    content = half["response"]["body"]["choices"][0]["message"]["content"]
    assert content == "half an emoji \ufffd"
    closes = by_key["closes"].line["error"]
    assert closes == {"code": "connection_error", "message": "the server closed the connection "
                      "without a whole answer, 3 tries"}  # fmt: skip
    for outcome in outcomes.values():  # each line as checkpointed: strict JSON, UTF-8
        text = safe_line(outcome.line)
        json.loads(text.encode("utf-8"), parse_constant=lambda c: pytest.fail(c))


def test_a_server_that_goes_away_and_comes_back_loses_nothing(server: FakeOpenAI) -> None:
    server.latency_s = 0.02
    requests = [chat(i, f"q{i}") for i in range(120)]
    waits: list[str | None] = []

    def outage() -> None:
        server.wait_for(lambda s: len(s.entries("ok")) >= 40)
        server.go_away()
        wait_for(lambda: any(w and "connection refused" in w for w in waits), timeout_s=30)
        server.come_back()

    thread = threading.Thread(target=outage)
    thread.start()
    outcomes = send(server, requests, concurrency=4, on_waiting=waits.append, server_wait_s=60)
    thread.join()
    assert all(not o.failed for o in outcomes.values()), [
        o.line for o in outcomes.values() if o.failed]  # fmt: skip
    assert set(server.served().values()) == {1} and len(server.served()) == 120
    messages = [w for w in waits if w]
    assert all(m.startswith(f"waiting for {server.url}: ") for m in messages)
    assert any(m.startswith(f"waiting for {server.url}: connection refused, ") for m in messages)
    assert all(m.endswith(" s left") for m in messages) and waits[-1] is None


# --- whole jobs -------------------------------------------------------------------------------


def test_a_chunk_that_keeps_raising_fails_its_job_with_the_reason_and_a_partial_output(
    settings: Settings, server: FakeOpenAI, start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:  # fmt: skip
    # A fault no request handling catches, put into the real worker process: chunk 1 raises
    # each time it runs, before it sends anything.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import workers.inference.state as state\n"
        "original = state.BatchState.finished_indexes\n"
        "def broken(self, chunk):\n"
        "    if chunk == 1:\n"
        "        raise RuntimeError('injected: the checkpoint cannot be read')\n"
        "    return original(self, chunk)\n"
        "state.BatchState.finished_indexes = broken\n"
    )
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    start_worker("--queues", "inference",
                 env={**FAST, "PYTHONPATH": path, "GPUJOBS_RETRY_BACKOFF_S": "0.2"})  # fmt: skip
    batch = tmp_path / "raise.jsonl"
    batch.write_text("\n".join(good_lines(30)) + "\n")
    started = time.monotonic()
    done = gpujobs("infer", str(batch), "--endpoint", server.url, "--chunk-size", "10", "--wait",
                   timeout=180)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    [message] = done.stderr.strip().splitlines()
    job_id = message.split()[1]
    assert message == (f"job {job_id} failed: chunk 1 failed 3 times; the last: RuntimeError: "
                       "injected: the checkpoint cannot be read")  # fmt: skip
    assert f"{job_id} failed: 20 completed, 0 failed, 10 not attempted" in done.stdout
    assert time.monotonic() - started < 120
    record = Client(settings).job(job_id).status()
    assert record.state is JobState.FAILED and (record.result or {})["partial"] is True
    output = settings.media / InferenceSpec.model_validate(record.spec).output
    ids = [json.loads(x)["custom_id"] for x in output.read_text().splitlines()]
    assert ids == [f"r{i}" for i in range(30) if not 10 <= i < 20]  # chunks 0 and 2, in order
    assert set(server.served()) == {f"q{i}" for i in range(30) if not 10 <= i < 20}
    assert not {f"q{i}" for i in range(10, 20)} & {e.key for e in server.entries()}  # chunk 1
    # sent nothing (the server's 429s beyond its capacity are the adaptive window finding it)


def test_misbehaving_answers_in_a_whole_job_end_it_with_every_line(
    client: Client, settings: Settings, server: FakeOpenAI,
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    server.permanent = {"q3": "garbage", "q4": "surrogate", "q5": "nan", "q6": "sse",
                        "q7": "disconnect", "q8": "hang"}  # fmt: skip
    server.faults = {"q9": ["truncate"], "q10": ["trickle"]}
    start_worker("--queues", "inference", env=FAST)
    rows = [request(f"r{i}", f"q{i}") for i in range(20)]
    job = client.submit_inference(rows, endpoint=server.url, request_timeout_s=2, max_retries=1,
                                  chunk_size=7)  # fmt: skip
    record = job.wait(timeout=120)
    assert record.state is JobState.SUCCEEDED, record.error
    raw = (settings.media / InferenceSpec.model_validate(record.spec).output).read_bytes()
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(c))
             for x in raw.decode("utf-8").splitlines()]  # fmt: skip
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(20)]
    codes = {x["custom_id"]: (x["error"] or {}).get("code") for x in lines}
    assert codes == {**{f"r{i}": None for i in range(20)}, "r3": "invalid_response",
                     "r5": "invalid_response", "r6": "invalid_response",
                     "r7": "connection_error", "r8": "timeout"}  # fmt: skip
    assert (record.result or {})["request_counts"] == {"total": 20, "completed": 15, "failed": 5}


def watch_waiting(job: Any, seen: list[str]) -> Any:
    """Follow a job to its end, keeping every `waiting` message its record showed."""
    final = None
    for record in job.watch(timeout=300):
        message = (record.result or {}).get("waiting")
        if message and (not seen or seen[-1] != message):
            seen.append(message)
        final = record
        if record.state.terminal:
            break
    return final


@pytest.mark.slow
def test_a_server_away_for_60_s_mid_batch_loses_no_request_and_sends_none_twice(
    client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    rows = [request(f"r{i:04d}", f"q{i}") for i in range(1000)]
    with FakeOpenAI(latency_s=0.01, capacity=8) as server:
        start_worker("--queues", "inference", env=FAST)
        job = client.submit_inference(rows, endpoint=server.url, max_concurrency=8,
                                      chunk_size=250)  # fmt: skip
        server.wait_for(lambda s: len(s.entries("ok")) >= 400, timeout_s=120)
        server.go_away()
        away = time.monotonic()
        seen: list[str] = []
        back = threading.Timer(60, server.come_back)
        back.start()
        try:
            record = watch_waiting(job, seen)
        finally:
            back.cancel()
        assert time.monotonic() - away >= 60
        served = server.served()

    assert record.state is JobState.SUCCEEDED, record.error
    assert (record.result or {})["request_counts"] == {"total": 1000, "completed": 1000,
                                                       "failed": 0}  # fmt: skip
    lines = (settings.media / InferenceSpec.model_validate(record.spec).output).read_text()
    assert [json.loads(x)["custom_id"] for x in lines.splitlines()] == [
        r["custom_id"] for r in rows
    ]
    # The server's log: every request answered once; none sent again after its answer.
    assert len(served) == 1000 and set(served.values()) == {1}
    # While it waited, the job said so: the URL, the reason, the time left.
    # (The first probe may still find a connection that the stopping server reset.)
    assert seen and all(m.startswith(f"waiting for {server.url}: ") for m in seen)
    assert any(m.startswith(f"waiting for {server.url}: connection refused, ") for m in seen)
    lefts = [int(m.rsplit(", ", 1)[1].removesuffix(" s left")) for m in seen]
    assert lefts == sorted(lefts, reverse=True) and lefts[0] <= 120


def test_a_server_that_does_not_come_back_fails_the_job_with_what_finished(
    client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    rows = [request(f"r{i:03d}", f"q{i}") for i in range(200)]
    with FakeOpenAI(latency_s=0.01, capacity=4) as server:
        start_worker("--queues", "inference", env=FAST)
        job = client.submit_inference(rows, endpoint=server.url, max_concurrency=4,
                                      chunk_size=50, server_wait_s=2)  # fmt: skip
        server.wait_for(lambda s: len(s.entries("ok")) >= 60, timeout_s=60)
        server.go_away()
        record = job.wait(timeout=60)
        served = server.served()

    assert record.state is JobState.FAILED
    # Said by the chunk that was sending, or by the next one if the server went at a chunk's end.
    assert record.error in (
        f"inference server {server.url} went away and did not come back in 2 s: connection "
        "refused", f"inference server {server.url} did not come up in 2 s: connection refused",
    )  # fmt: skip
    result = record.result or {}
    counts = result["request_counts"]
    assert counts["completed"] == len(served) and counts["failed"] == 0
    assert result["partial"] is True and result["not_attempted"] == 200 - len(served)
    output = settings.media / InferenceSpec.model_validate(record.spec).output
    ids = [json.loads(x)["custom_id"] for x in output.read_text().splitlines()]
    assert ids == sorted(ids) and len(ids) == len(served)
