"""The OpenAI Batch API (`gpujobs api`), driven by the `openai` package's own client.

A real `gpujobs api` process (uvicorn on a free port), a real worker process, real Valkey, and
the fake OpenAI server (tests/openai_server.py) as the inference backend. The client is the
stock `openai.OpenAI` with only base_url and api_key changed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gpujobs import keys
from gpujobs.api.batches import derive_status
from gpujobs.config import Settings
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import WorkerProcess, wait_for
from tests.openai_server import FakeOpenAI

API_KEY = "test-key-1234"
FAST = {"GPUJOBS_INFERENCE_BACKOFF_S": "0.02", "GPUJOBS_INFERENCE_BACKOFF_MAX_S": "0.2"}
READY_S = 60.0  # the API process's start, on a loaded machine
BATCH_S = 120.0  # a small batch's run, on a loaded machine


class ApiProcess:
    """`gpujobs api --port 0`: `start()` returns once it prints the URL it serves."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._ready = threading.Event()

    def start(self) -> ApiProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobs", "api", "--port", "0", *self.args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(READY_S) or not self.base_url:
            self.stop()
            raise RuntimeError(f"gpujobs api did not start:\n{self.log_path.read_text()}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace")
                if "serving the Batch API on " in text:
                    self.base_url = text.rsplit(" ", 1)[1].strip()
                    self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def backend() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(latency_s=0.01, capacity=8) as fake:
        yield fake


@pytest.fixture
def api(
    settings: Settings, backend: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiProcess]:
    """A `gpujobs api` process with a key, queueing batches for the fake backend."""
    monkeypatch.setenv("GPUJOBS_VLLM_ENDPOINT", backend.url)
    monkeypatch.setenv("GPUJOBS_INFERENCE_CONCURRENCY", "2")
    monkeypatch.setenv("GPUJOBS_INFERENCE_CHUNK_SIZE", "10")
    process = ApiProcess({**os.environ, "GPUJOBS_API_KEY": API_KEY}, tmp_path / "api.log")
    yield process.start()
    process.stop()


@pytest.fixture
def oa(api: ApiProcess) -> openai.OpenAI:
    """The stock client: only base_url and api_key differ from OpenAI's."""
    return openai.OpenAI(base_url=api.base_url, api_key=API_KEY, max_retries=0)


def rows(count: int, endpoint: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    """Requests whose text (the fake server's key) is `q<i>` and custom_id `req-<i>`."""
    out = []
    for i in range(count):
        if endpoint == "/v1/embeddings":
            body: dict[str, Any] = {"model": "fake-model", "input": f"q{i}"}
        else:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"q{i}"}]}
        out.append({"custom_id": f"req-{i:03d}", "method": "POST", "url": endpoint, "body": body})
    return out


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def wait_status(oa: openai.OpenAI, batch_id: str, wanted: set[str]) -> Any:
    """Poll the batch (what a Batch API user does) until its status is one of `wanted`."""
    return wait_for(
        lambda: (b := oa.batches.retrieve(batch_id)).status in wanted and b,
        timeout_s=BATCH_S, interval_s=0.2,
    )  # fmt: skip


def test_openai_client_runs_a_whole_batch(
    oa: openai.OpenAI, backend: FakeOpenAI, settings: Settings,
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    backend.permanent = {"q7": 400, "q18": 422}
    upload = oa.files.create(file=("questions.jsonl", jsonl(rows(25))), purpose="batch")
    assert upload.id.startswith("file-") and upload.purpose == "batch"
    assert upload.bytes == len(jsonl(rows(25))) and upload.filename == "questions.jsonl"
    assert oa.files.retrieve(upload.id).id == upload.id
    assert oa.files.content(upload.id).content == jsonl(rows(25))

    # No worker yet: the batch is checked and queued, and waits as `validating`.
    batch = oa.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"team": "search", "run": "nightly"},
    )  # fmt: skip
    assert batch.status == "validating", batch
    assert batch.id.startswith("batch_") and batch.input_file_id == upload.id
    assert batch.metadata == {"team": "search", "run": "nightly"}
    assert batch.request_counts is not None and batch.request_counts.total == 25
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.model == "fake-model"

    start_worker("--queues", "inference", env=FAST)
    done = wait_status(oa, batch.id, {"completed", "failed", "expired", "cancelled"})
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (25, 23, 2)  # fmt: skip
    assert done.in_progress_at is not None and done.completed_at is not None
    assert done.usage is not None and done.usage.total_tokens == 23 * 6  # 1 prompt + 5 each
    assert done.output_file_id and done.error_file_id

    out = [json.loads(line) for line in oa.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in out] == [
        f"req-{i:03d}" for i in range(25) if i not in (7, 18)
    ]
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in out)
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: q0"
    errors = [json.loads(line) for line in oa.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [
        ("req-007", 400), ("req-018", 422)
    ]  # fmt: skip
    assert errors[0]["error"]["message"] == "injected 400 for q7"
    output_file = oa.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.bytes == len(oa.files.content(done.output_file_id).content)

    listed = {f.id for f in oa.files.list()}
    assert {upload.id, done.output_file_id, done.error_file_id} <= listed
    assert [f.id for f in oa.files.list(purpose="batch")] == [upload.id]
    # One at a time, as the client's auto-pagination walks `after`: the same files, in order.
    assert [f.id for f in oa.files.list(limit=1)] == [f.id for f in oa.files.list()]
    assert oa.files.list(order="asc").data[0].id == upload.id

    # Finished: cancelling is refused as the Batch API refuses it.
    with pytest.raises(openai.ConflictError) as refused:
        oa.batches.cancel(batch.id)
    assert refused.value.status_code == 409
    assert "Cannot cancel a batch with status 'completed'" in refused.value.message

    # The job record is the source of truth: the batch is the job of the same id.
    job_id = batch.id.removeprefix("batch_")
    client = redis.Redis.from_url(os.environ["GPUJOBS_BROKER_URL"])
    assert client.hget(keys.job(job_id), "state") == b"succeeded"

    # Deleting the input leaves the batch (it runs from its own copy); the id is gone after.
    assert oa.files.delete(upload.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        oa.files.retrieve(upload.id)
    assert oa.batches.retrieve(batch.id).status == "completed"


def test_cancel_another_batch_keeps_what_finished(
    oa: openai.OpenAI, backend: FakeOpenAI, start_worker: Callable[..., WorkerProcess]
) -> None:
    backend.latency_s = 0.3  # slow enough to cancel in the middle
    first = oa.files.create(file=("slow.jsonl", jsonl(rows(40, "/v1/embeddings"))),
                            purpose="batch")  # fmt: skip
    quick = oa.files.create(file=("quick.jsonl", jsonl(rows(2))), purpose="batch")
    slow = oa.batches.create(input_file_id=first.id, endpoint="/v1/embeddings",
                             completion_window="24h")  # fmt: skip
    other = oa.batches.create(input_file_id=quick.id, endpoint="/v1/chat/completions",
                              completion_window="24h")  # fmt: skip
    start_worker("--queues", "inference", env=FAST)
    backend.wait_for(lambda fake: len(fake.entries("ok")) >= 3, timeout_s=BATCH_S)
    running = oa.batches.retrieve(slow.id)
    assert running.status == "in_progress", running

    cancelled = oa.batches.cancel(slow.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    final = wait_status(oa, slow.id, {"cancelled"})
    assert final.request_counts is not None
    assert 0 < final.request_counts.completed < 40
    assert final.cancelled_at is not None and final.output_file_id
    out = oa.files.content(final.output_file_id).text.splitlines()
    assert len(out) == final.request_counts.completed
    assert all(json.loads(line)["response"]["body"]["object"] == "list" for line in out)
    # Cancelling again is no error; the other batch is untouched by it.
    assert oa.batches.cancel(slow.id).status == "cancelled"
    assert wait_status(oa, other.id, {"completed", "failed"}).status == "completed"

    # Newest first, a page at a time, as the client's auto-pagination walks it.
    page = oa.batches.list(limit=1)
    assert [b.id for b in page.data] == [other.id] and page.has_more
    assert [b.id for b in oa.batches.list(limit=1, after=other.id).data] == [slow.id]
    assert [b.id for b in oa.batches.list(limit=1)] == [other.id, slow.id]  # auto-paginated


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error body, checked to have exactly the OpenAI API's shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    error: dict[str, Any] = body["error"]
    return error


def headers_only_upload(base_url: str, headers: str, declared: int) -> int:
    """POST /v1/files announcing `declared` bytes but sending none; the status it gets back
    (a server that waited for the body would time out here instead)."""
    url = httpx.URL(base_url)
    with socket.create_connection((url.host, url.port or 80), timeout=30) as conn:
        conn.sendall((f"POST {url.path}/files HTTP/1.1\r\nHost: {url.host}\r\n{headers}"
                      "Content-Type: multipart/form-data; boundary=x\r\n"
                      f"Content-Length: {declared}\r\n\r\n").encode())  # fmt: skip
        status_line = conn.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def test_bad_input_is_answered_as_the_openai_api_does(
    api: ApiProcess, oa: openai.OpenAI, settings: Settings
) -> None:
    raw = httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
    # A wrong key, and none.
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=api.base_url, api_key="nope", max_retries=0).files.list()
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert error_of(httpx.get(f"{api.base_url}/batches"))["message"].startswith(
        "You didn't provide an API key"
    )

    # An upload that is not a valid batch file: the line at fault, nothing stored.
    bad = jsonl(rows(2)) + b'{"custom_id": "req-000", "method": "POST"}\n'
    with pytest.raises(openai.BadRequestError) as invalid:
        oa.files.create(file=("bad.jsonl", bad), purpose="batch")
    assert invalid.value.status_code == 400
    assert "line 3: custom_id 'req-000' repeats line 1" in invalid.value.message
    assert invalid.value.param == "file"
    assert list(oa.files.list()) == []
    assert not list((settings.media / "api" / "files").glob("*"))
    response = raw.post("/files", files={"file": ("x.jsonl", b"not json\n")},
                        data={"purpose": "batch"})  # fmt: skip
    assert response.status_code == 400
    assert "line 1: not valid JSON" in error_of(response)["message"]
    response = raw.post("/files", files={"file": ("x.jsonl", jsonl(rows(1)))},
                        data={"purpose": "fine-tune"})  # fmt: skip
    assert response.status_code == 400 and error_of(response)["param"] == "purpose"
    response = raw.post("/files", files={"file": ("x.jsonl", jsonl(rows(1)))})
    assert response.status_code == 400
    assert error_of(response)["message"] == "Missing required parameter: 'purpose'."

    # An upload is answered before its body is read when its key or declared size is wrong:
    # headers alone are sent, and the answer comes without the body it announced.
    for headers, status in (("", 401), (f"Authorization: Bearer {API_KEY}\r\n", 413)):
        assert headers_only_upload(api.base_url, headers, 10**12) == status
    # Ids that name nothing.
    with pytest.raises(openai.NotFoundError) as missing:
        oa.files.retrieve("file-0123456789abcdef01234567")
    assert missing.value.message.endswith("No such File object: file-0123456789abcdef01234567")
    with pytest.raises(openai.NotFoundError):
        oa.files.content("file-../../etc/passwd")
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve("batch_0123456789ab")
    with pytest.raises(openai.NotFoundError):
        oa.batches.cancel("batch_nope")
    assert error_of(raw.get("/nowhere"))["message"] == "Invalid URL (GET /v1/nowhere)"

    # Batches the Batch API would refuse; none is queued.
    upload = oa.files.create(file=("ok.jsonl", jsonl(rows(3))), purpose="batch")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"endpoint": "/v1/responses"}, "endpoint", "is not supported here"),
        ({"completion_window": "48h"}, "completion_window", "only '24h'"),
        ({"input_file_id": "file-0123456789abcdef01234567"}, "input_file_id", "no such File"),
        ({"endpoint": "/v1/embeddings"}, "input_file_id", "line 1: url '/v1/chat/completions' "
         "does not match the batch's endpoint '/v1/embeddings'"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 pairs"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "values 512"),
        ({"priority": 3}, "priority", "Unrecognized request argument supplied: priority"),
    ]  # fmt: skip
    # Lines of Unicode whitespace alone (a no-break space, U+2028) are blank to every reader.
    spaced = b"\xc2\xa0\n" + jsonl(rows(1)) + "\u2028\n".encode()
    spaced_upload = oa.files.create(file=("spaced.jsonl", spaced), purpose="batch")
    mismatch = "line 2: url '/v1/chat/completions' does not match"  # line 1 is blank
    cases.append(({"endpoint": "/v1/embeddings", "input_file_id": spaced_upload.id},
                  "input_file_id", mismatch))  # fmt: skip
    for change, param, words in cases:
        body = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **change}  # fmt: skip
        response = raw.post("/batches", json=body)
        assert response.status_code == 400, (change, response.text)
        error = error_of(response)
        assert error["param"] == param and words in error["message"], (change, error)
    response = raw.post("/batches", json={"endpoint": "/v1/chat/completions"})
    assert error_of(response)["message"] == "Missing required parameter: 'input_file_id'."
    response = raw.post(
        "/batches", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (
        response.status_code == 400
        and "could not parse the JSON body" in error_of(response)["message"]
    )
    assert raw.get("/batches", params={"limit": 0}).status_code == 400
    client = redis.Redis.from_url(os.environ["GPUJOBS_BROKER_URL"])
    assert not client.keys(keys.job("*")) and client.zcard(keys.API_BATCHES) == 0
    assert oa.batches.list().data == []


@pytest.mark.parametrize("key", [None, ""])  # an empty Secret value is no key
def test_refuses_to_listen_beyond_loopback_without_a_key(
    settings: Settings, key: str | None
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUJOBS_API_KEY"}
    if key is not None:
        env["GPUJOBS_API_KEY"] = key
    result = subprocess.run(
        [sys.executable, "-m", "gpujobs", "api", "--address", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: refusing to serve the API on 0.0.0.0 without an API key: set GPUJOBS_API_KEY "
        "(or listen on 127.0.0.1)"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unreachable_broker_is_one_line(settings: Settings) -> None:
    env = {**os.environ, "GPUJOBS_BROKER_URL": "redis://127.0.0.1:1/0",
           "GPUJOBS_CONNECT_TIMEOUT_S": "1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "gpujobs", "api", "--port", "0"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the broker at"), lines


def record_in(state: JobState, **fields: Any) -> JobRecord:
    spec = {"input": "batches/x/requests.jsonl", "output": "batches/x/output.jsonl",
            "requests": 10, "deadline_s": 100.0}  # fmt: skip
    return JobRecord(id="0123456789ab", kind=JobKind.INFERENCE, state=state, spec=spec,
                     created_at=1000.0, **fields)  # fmt: skip


@pytest.mark.parametrize(
    ("state", "fields", "status"),
    [
        (JobState.QUEUED, {}, "validating"),
        (JobState.RUNNING, {"result": {"request_counts": {"total": 10, "completed": 4,
                                                          "failed": 1}}}, "in_progress"),
        (JobState.RUNNING, {"result": {"request_counts": {"total": 10, "completed": 9,
                                                          "failed": 1}}}, "finalizing"),
        (JobState.SUCCEEDED, {"finished_at": 1050.0}, "completed"),
        (JobState.SUCCEEDED, {"finished_at": 1100.0}, "expired"),  # the window passed
        (JobState.FAILED, {"finished_at": 1050.0}, "failed"),
        (JobState.CANCELLED, {"result": {"chunks": {"total": 3, "done": 1}}}, "cancelling"),
        (JobState.CANCELLED, {"result": {"chunks": {"total": 3, "done": 3}}}, "cancelled"),
    ],
)  # fmt: skip
def test_status_is_derived_from_the_job_record(
    state: JobState, fields: dict[str, Any], status: str
) -> None:
    assert derive_status(record_in(state, **fields)) == status
