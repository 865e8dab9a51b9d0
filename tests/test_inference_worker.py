"""Batch inference end to end: real Valkey, real worker processes, a real OpenAI-speaking server.

- 500 requests shared by two workers: every custom_id once, in order; injected 429/5xx and
  disconnects retried; permanent failures reported per request.
- A worker SIGKILLed mid-batch: another finishes it without sending a finished request again.
- Cancel keeps what finished and writes a partial output; a deadline fails what is left.
- The CLI: infer/submit --wait, results, and an endpoint that refuses connections.
- In-process: the last chunk's merge runs once, a dead finisher's chunk is resent, an image
  swapped for a symlink out of the media root fails alone, a job failed elsewhere gets no output.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gpujobs import keys
from gpujobs.batch import BATCHES
from gpujobs.cli.render import job_detail
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import InferenceSpec, JobState
from tests.helpers import WorkerProcess, wait_for
from tests.openai_server import FakeOpenAI
from workers.inference.chunk import (
    BatchOutput,
    BatchState,
    ChunkRef,
    image_resolver,
    requeue_expired_chunks,
    run_chunk,
)
from workers.inference.client import BatchRequest, InferenceClient, Outcome, output_line
from workers.runtime import WorkerRuntime

# Workers retry fast here: the backoff is not what these tests measure.
FAST = {"GPUJOBS_INFERENCE_BACKOFF_S": "0.02", "GPUJOBS_INFERENCE_BACKOFF_MAX_S": "0.2"}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency_s=0.01, capacity=8) as fake:
        yield fake


def batch_rows(count: int) -> list[dict[str, Any]]:
    """Chat requests, with every 5th an embedding and every 7th a completion; request i's
    text (what the server logs as its key) is `q<i>`, its custom_id `req-<i>`."""
    rows = []
    for i in range(count):
        if i % 5 == 4:
            url, body = "/v1/embeddings", {"model": "fake-model", "input": f"q{i}"}
        elif i % 7 == 6:
            url, body = "/v1/completions", {"prompt": f"q{i}", "max_tokens": 5}  # no model
        else:
            url = "/v1/chat/completions"
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"q{i}"}]}
        rows.append({"custom_id": f"req-{i:04d}", "method": "POST", "url": url, "body": body})
    return rows


def write_batch(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def key_of(custom_id: str) -> str:
    return f"q{int(custom_id.removeprefix('req-'))}"


def test_500_requests_shared_by_two_workers(
    client: Client, settings: Settings, server: FakeOpenAI,
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    rows = batch_rows(500)
    transient = {f"q{i}": fault for i, fault in zip(range(3, 500, 25), [
        [500], [429], ["disconnect"], [503, 500], [502], [429, 429], ["disconnect", 500],
        [504], [500], [429], ["disconnect"], [500, 503], [429], [500], [502], [429], [500],
        ["disconnect"], [503], [429]], strict=True)}  # fmt: skip
    server.faults = {key: list(faults) for key, faults in transient.items()}
    server.permanent = {"q10": 400, "q111": 400, "q222": 422, "q333": 500, "q444": 503}
    source = write_batch(settings.media / "jobs" / "five-hundred.jsonl", rows)
    for name in ("a@test", "b@test"):
        start_worker("--queues", "inference", "--hostname", name, env=FAST)
    # A fixed 4 per chunk (not adaptive): the bound this test pins.
    job = client.submit_inference(source, endpoint=server.url, max_concurrency=4, chunk_size=100,
                                  max_retries=3, adaptive=False)  # fmt: skip
    record = job.wait(timeout=120)

    assert record.state is JobState.SUCCEEDED, record.error
    spec = InferenceSpec.model_validate(record.spec)
    lines = read_lines(settings.media / spec.output)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in rows]
    assert len({line["id"] for line in lines}) == 500
    by_id = {line["custom_id"]: line for line in lines}
    for key in transient:  # retried until they succeeded
        line = by_id[f"req-{int(key[1:]):04d}"]
        assert line["error"] is None and line["response"]["status_code"] == 200, line
    failed_keys = set(server.permanent)
    for key, status in server.permanent.items():
        line = by_id[f"req-{int(key[1:]):04d}"]
        assert line["response"]["status_code"] == status
        assert line["error"]["message"] == f"injected {status} for {key}"
    errors = read_lines(settings.media / spec.errors_output)
    assert sorted(key_of(e["custom_id"]) for e in errors) == sorted(failed_keys)
    # Each request answered exactly once: nothing was sent again after it succeeded.
    served = server.served()
    assert set(served) == {f"q{i}" for i in range(500)} - failed_keys
    assert set(served.values()) == {1}
    # Two chunks in flight at most, four requests each: the server's 8 were never exceeded.
    assert server.entries("rejected") == [] and server.peak <= 8
    # Requests without a model went to the server's only one; embeddings came back as such.
    assert by_id["req-0006"]["response"]["body"]["object"] == "text_completion"
    assert by_id["req-0004"]["response"]["body"]["data"][0]["object"] == "embedding"
    result = record.result or {}
    assert result["request_counts"] == {"total": 500, "completed": 495, "failed": 5}
    assert result["requests_per_s"] > 0 and result["tokens_per_s"] > 0
    assert result["tokens"]["completion"] == 5 * (495 - 99)  # embeddings generate nothing
    assert result["chunks"] == {"total": 5, "done": 5} and result["partial"] is False
    assert record.percent == 100.0
    # Nothing left behind: part files, checkpoints and leases are gone. The merging worker
    # removes the parts just after it records the end (a crash in between leaves parts behind,
    # never a running job without them): wait for it.
    wait_for(lambda: not (settings.media / BATCHES / job.id / "parts").exists(), timeout_s=10)
    assert not client.redis.keys(f"{keys.PREFIX}:batch:{job.id}:chunk:*")
    # The last chunk lets go of its lease once it returns, just after the job ends.
    wait_for(lambda: not client.redis.keys(f"{keys.PREFIX}:batch:{job.id}:lease:*"), timeout_s=10)


def finished_custom_ids(client: Client, settings: Settings, job_id: str) -> set[str]:
    """What a batch has finished: checkpointed requests and the lines of written part files."""
    done: set[str] = set()
    for key in client.redis.keys(f"{keys.PREFIX}:batch:{job_id}:chunk:*"):
        done |= {json.loads(v)["custom_id"] for v in client.redis.hvals(key)}
    parts = settings.media / BATCHES / job_id / "parts"
    for part in parts.glob("*.jsonl") if parts.exists() else []:
        done |= {line["custom_id"] for line in read_lines(part)}
    return done


def test_a_killed_worker_resends_nothing_finished_and_loses_nothing(
    client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    # The dead worker's chunk lease (2 s here, 30 s by default) expires; the second worker's
    # watchdog resends the chunk, long before Redis's visibility timeout (12 h) would.
    env = {**FAST, "GPUJOBS_INFERENCE_LEASE_S": "2", "GPUJOBS_WATCHDOG_INTERVAL_S": "0.5"}
    rows = batch_rows(300)
    source = write_batch(settings.media / "kill.jsonl", rows)
    with FakeOpenAI(latency_s=0.04, capacity=4) as server:
        first = start_worker("--queues", "inference", "--hostname", "first@test", env=env)
        job = client.submit_inference(source, endpoint=server.url, max_concurrency=4,
                                      chunk_size=100, adaptive=False)  # fmt: skip
        server.wait_for(lambda s: len(s.entries("ok")) >= 150)  # in the middle of chunk 1
        first.kill()  # SIGKILL, whole process group: no ack, no goodbye
        finished = finished_custom_ids(client, settings, job.id)
        sent_before = len(server.entries())
        assert 140 <= len(finished) < 300
        assert job.status().state is JobState.RUNNING
        start_worker("--queues", "inference", "--hostname", "second@test", env=env)
        record = job.wait(timeout=90)

    assert record.state is JobState.SUCCEEDED, record.error
    lines = read_lines(settings.media / InferenceSpec.model_validate(record.spec).output)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in rows]  # none lost
    assert all(line["error"] is None for line in lines)
    served = server.served()
    # The request log proves it: no request finished before the kill was sent again...
    resent = {key for key, count in served.items() if count > 1}
    assert not resent & {key_of(cid) for cid in finished}
    # ...and only what was in flight when the worker died was sent twice: at most 4 waiting
    # for their answers, and at most 4 answered but not yet checkpointed (a request's slot is
    # freed when its answer arrives, and the checkpoint follows on the event loop's next turn).
    assert len(resent) <= 2 * 4 and sum(served.values()) <= 300 + 2 * 4
    assert len(server.entries()) > sent_before
    assert (record.result or {})["request_counts"] == {"total": 300, "completed": 300,
                                                       "failed": 0}  # fmt: skip


def test_cancel_keeps_what_finished_and_a_deadline_fails_the_rest(
    client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    rows = batch_rows(200)
    source = write_batch(settings.media / "cancel.jsonl", rows)
    with FakeOpenAI(latency_s=0.05, capacity=2) as server:
        start_worker("--queues", "inference", env=FAST)
        job = client.submit_inference(source, endpoint=server.url, max_concurrency=2,
                                      chunk_size=50, adaptive=False)  # fmt: skip
        server.wait_for(lambda s: len(s.entries("ok")) >= 30)
        assert job.cancel()
        spec = InferenceSpec.model_validate(job.status().spec)
        # Every chunk settles (the running one stops, the queued ones see the cancel).
        wait_for(lambda: ((job.status().result or {}).get("chunks") or {}).get("done") == 4,
                 timeout_s=30)  # fmt: skip
        sent = len(server.entries())
        record = job.status()
        lines = read_lines(settings.media / spec.output)
        # The deadline: 40 requests, 2 at a time, 0.05 s each, 0.5 s allowed.
        server.latency_s = 0.05
        late = client.submit_inference(
            write_batch(settings.media / "late.jsonl", batch_rows(40)), endpoint=server.url,
            max_concurrency=2, deadline_s=0.5,
        )  # fmt: skip
        late_record = late.wait(timeout=30)
        assert len(server.entries()) - sent < 40

    assert record.state is JobState.CANCELLED
    result = record.result or {}
    assert result["partial"] is True
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(job_detail(record))  # what `gpujobs status` shows: the partial output, named
    assert (
        f"output    {spec.output} (partial: the job cancelled before every request was done)"
        in console.export_text()
    )
    ids = [line["custom_id"] for line in lines]
    # The server had answered 30 when the cancel went in; the client may not yet have read the
    # answers of the (at most 2) requests it had in flight, which the cancel then drops.
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and 28 <= len(ids) < 200
    assert result["request_counts"]["completed"] == len(ids)
    # Sending stopped: besides what finished, only the requests in flight (2) were sent.
    assert sent - len(ids) <= 2
    assert late_record.state is JobState.SUCCEEDED
    counts = (late_record.result or {})["request_counts"]
    assert counts["failed"] > 0 and counts["completed"] + counts["failed"] == 40
    late_lines = read_lines(settings.media / InferenceSpec.model_validate(late_record.spec).output)
    assert [line["custom_id"] for line in late_lines] == [f"req-{i:04d}" for i in range(40)]
    failed = [line for line in late_lines if line["error"]]
    assert {line["error"]["code"] for line in failed} == {"deadline_exceeded"}


def gpujobs(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "COLUMNS": "160"}, check=False,
    )  # fmt: skip


def test_cli_infer_submit_results_and_a_refused_endpoint(
    settings: Settings, server: FakeOpenAI, start_worker: Callable[..., WorkerProcess],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    start_worker("--queues", "inference", env=FAST)
    server.permanent = {"q2": 400}
    batch = write_batch(tmp_path / "cli.jsonl", batch_rows(30))  # outside the media root
    done = gpujobs("infer", str(batch), "--endpoint", server.url, "--concurrency", "3", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded: 29 completed, 1 failed" in done.stdout
    assert "req/s" in done.stdout and "tok/s" in done.stdout
    job_id = done.stdout.split("succeeded:")[0].split()[-1]
    shown = gpujobs("results", job_id)
    assert shown.returncode == 0, shown.stderr
    output = settings.media / BATCHES / job_id / "cli.results.jsonl"
    assert f"output  {output}" in shown.stdout and "29 completed, 1 failed of 30" in shown.stdout
    streamed = gpujobs("results", job_id, "--stream")
    assert streamed.stdout == output.read_text()
    errors = gpujobs("results", job_id, "--stream", "--errors")
    assert [json.loads(x)["custom_id"] for x in errors.stdout.splitlines()] == ["req-0002"]

    # `submit` of a .jsonl is a batch; GPUJOBS_VLLM_ENDPOINT is the default endpoint.
    inside = write_batch(settings.media / "b" / "in.jsonl", batch_rows(5))
    monkeypatch.setenv("GPUJOBS_VLLM_ENDPOINT", server.url)
    submitted = gpujobs("submit", str(inside), "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert (settings.media / "b" / "in.results.jsonl").exists()

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    refused = gpujobs("infer", str(batch), "--endpoint", f"http://127.0.0.1:{port}/v1",
                      "--server-wait", "1", "--wait")  # fmt: skip
    assert refused.returncode == 1
    assert time.monotonic() - started < 30  # it waited, then failed: no hang
    [message] = refused.stderr.strip().splitlines()
    assert message.endswith(f"failed: inference server http://127.0.0.1:{port}/v1 did not "
                            "come up in 1 s: connection refused")  # fmt: skip
    failed_id = message.split()[1]
    # What was never sent is counted as such, not as "0 failed".
    assert f"{failed_id} failed: 0 completed, 0 failed, 30 not attempted" in refused.stdout
    missing = gpujobs("results", failed_id)
    assert missing.returncode == 1 and "failed with no output" in missing.stderr


def test_embedded_default_runs_a_batch_with_nothing_else_running(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env.update(GPUJOBS_STATE_DIR=str(tmp_path / "state"), COLUMNS="160", **FAST)
    batch = write_batch(tmp_path / "batch.jsonl", batch_rows(20))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpujobs", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    try:
        done = run("infer", str(batch), "--endpoint", server.url, "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "succeeded: 20 completed, 0 failed" in done.stdout
        job_id = done.stdout.split("succeeded:")[0].split()[-1]
        output = tmp_path / "state" / "media" / BATCHES / job_id / "batch.results.jsonl"
        assert [json.loads(x)["custom_id"] for x in output.read_text().splitlines()] == [
            f"req-{i:04d}" for i in range(20)]  # fmt: skip
    finally:
        assert run("down").returncode == 0


def stale_lease(client: Client, job_id: str, chunk: int, start: int, count: int) -> None:
    """Chunk `chunk`'s lease as a worker that died leaves it: expired, its key gone."""
    member = json.dumps([job_id, chunk, start, count, 0], separators=(",", ":"))
    client.redis.zadd(keys.CHUNK_LEASES, {member: 0})


def test_the_last_merge_runs_once_and_a_dead_finishers_chunk_is_resent(
    client: Client, settings: Settings
) -> None:
    job = client.submit_inference(batch_rows(4), endpoint="http://127.0.0.1:9/v1", chunk_size=2)
    rt = WorkerRuntime(settings=settings, pid=os.getpid())
    spec = InferenceSpec.model_validate(job.status().spec)
    state = BatchState(rt.store.redis, job.id, settings.record_ttl_s)
    output = BatchOutput(rt, spec, job.id)
    rt.store.update(job.id, state=JobState.RUNNING, started_at=time.time())
    for chunk in (0, 1):
        for index in (2 * chunk, 2 * chunk + 1):
            cid = f"req-{index:04d}"
            response = {"status_code": 200, "request_id": "r", "body": {}}
            state.checkpoint(chunk, Outcome(index, cid, output_line(cid, response=response), False))
        output.write_part(chunk, state.finished(chunk))
        state.mark_done(chunk)
        state.drop_checkpoint(chunk)
        # Its worker died after marking it done: resent only when it may have been the one to
        # write the output (every chunk done, the job still running).
        stale_lease(client, job.id, chunk, 2 * chunk, 2)
        resent = requeue_expired_chunks(rt.store, client.app, max_attempts=3)
        assert resent == ([] if chunk == 0 else [f"{job.id}.1"])

    output.finish(state, rt.store)
    record = job.status()
    written = (settings.media / spec.output).read_text()
    assert record.state is JobState.SUCCEEDED and len(written.splitlines()) == 4
    output.finish(state, rt.store)  # a second delivery that also saw the last chunk done
    assert (settings.media / spec.output).read_text() == written
    assert job.status().finished_at == record.finished_at


def test_an_image_that_now_leads_out_of_the_media_root_fails_alone(
    settings: Settings, server: FakeOpenAI, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (settings.media / "img").mkdir()
    (settings.media / "img" / "cat.png").symlink_to(outside)  # swapped in after the check
    content = [{"type": "text", "text": "q0"},
               {"type": "image_url", "image_url": {"url": "img/cat.png"}}]  # fmt: skip
    body = {"model": "fake-model", "messages": [{"role": "user", "content": content}]}
    requests = [BatchRequest(0, "v0", "/v1/chat/completions", body),
                BatchRequest(1, "t1", "/v1/embeddings", {"input": "q1"})]  # fmt: skip
    outcomes: dict[str, Outcome] = {}
    rt = WorkerRuntime(settings=settings, pid=os.getpid())

    async def go() -> None:
        async with InferenceClient(server.url, resolve_image=image_resolver(rt)) as http:
            await http.run(requests, lambda o: outcomes.__setitem__(o.custom_id, o))

    asyncio.run(go())
    error = outcomes["v0"].line["error"]
    assert error["code"] == "invalid_image" and "outside the media root" in error["message"]
    assert not outcomes["t1"].failed
    assert all(entry.key != "q0" for entry in server.entries())  # never sent


def test_a_chunk_whose_server_never_came_up_writes_nothing_for_a_job_failed_elsewhere(
    client: Client, settings: Settings, server: FakeOpenAI
) -> None:
    server.healthy = False
    job = client.submit_inference(batch_rows(4), endpoint=server.url, chunk_size=2,
                                  server_wait_s=1.0)  # fmt: skip
    rt = WorkerRuntime(settings=settings, pid=os.getpid())
    # Another chunk gives up on the server first and fails the job while this one waits.
    other = threading.Timer(0.3, rt.store.update, args=(job.id,),
                            kwargs={"state": JobState.FAILED, "error": "server down"})  # fmt: skip
    other.start()
    try:
        result = run_chunk(rt, ChunkRef(job.id, 1, 2, 2, 0), worker="w@test")
    finally:
        other.join()
    assert result == {"stopped": "job ended"}
    spec = InferenceSpec.model_validate(job.status().spec)
    assert job.status().state is JobState.FAILED
    assert not (settings.media / spec.output).exists()


def test_a_group_of_checkpoints_counts_each_request_once_however_often_it_comes(
    client: Client, settings: Settings
) -> None:
    job = client.submit_inference(batch_rows(3), endpoint="http://127.0.0.1:9/v1", chunk_size=3)
    state = BatchState(client.redis, job.id, settings.record_ttl_s)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    def outcome(index: int, failed: bool) -> Outcome:
        cid = f"req-{index:04d}"
        return Outcome(index, cid, output_line(cid), failed, {} if failed else usage)

    assert state.checkpoint_many(0, []) == 0
    assert state.checkpoint_many(0, [outcome(0, False), outcome(1, True)]) == 2
    # A redelivery's group: 1 again (with another outcome, ignored) and 2 new.
    assert state.checkpoint_many(0, [outcome(1, False), outcome(2, False)]) == 1
    assert not state.checkpoint(0, outcome(0, False))
    stats = state.stats()
    assert (stats["completed"], stats["failed"], stats["total_tokens"]) == (2, 1, 10)
    assert sorted(state.finished(0)) == [0, 1, 2]
    assert json.loads(state.finished(0)[1])["custom_id"] == "req-0001"
    assert client.redis.ttl(keys.batch_checkpoint(job.id, 0)) > 0
    assert client.redis.ttl(keys.batch_stats(job.id)) > 0
