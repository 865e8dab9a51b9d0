"""Batch inference against a real vLLM: the CPU build, started by `scripts/vllm-dev.sh start`.

Two servers: a tiny random-weight Llama (chat and completions; its text is gibberish, the API
is vLLM's own) and all-MiniLM-L6-v2 (embeddings). The tests find them through
GPUJOBS_TEST_VLLM_URL and GPUJOBS_TEST_VLLM_EMBED_URL (default 127.0.0.1:8011 and :8012, as the
script starts them) and are skipped, with the reason, where no server answers there (failed
instead when GPUJOBS_TEST_VLLM_REQUIRED is set, as CI sets it).

- the batch client (workers/inference/client.py) alone: chat, completions, embeddings, `usage`, and
  vLLM's real 400 and 404 bodies, each failing alone;
- whole jobs through a real worker process, and through `gpujobs api` with the openai client.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import InferenceSpec, JobState
from tests.helpers import WorkerProcess
from tests.test_api import API_KEY, ApiProcess, wait_status
from workers.inference.client import BatchRequest, InferenceClient, Outcome, RetryPolicy

pytestmark = pytest.mark.vllm

CHAT_URL = os.environ.get("GPUJOBS_TEST_VLLM_URL", "http://127.0.0.1:8011/v1")
EMBED_URL = os.environ.get("GPUJOBS_TEST_VLLM_EMBED_URL", "http://127.0.0.1:8012/v1")
JOB_S = 300.0  # a small batch on the CPU build, with both cores loaded


@dataclass(frozen=True)
class Vllm:
    chat_url: str
    chat_model: str
    embed_url: str
    embed_model: str


def served_model(url: str) -> str:
    """The one model a vLLM server at `url` serves; pytest.skip when none answers there."""
    try:
        answer = httpx.get(f"{url}/models", timeout=5)
        answer.raise_for_status()
        return str(answer.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        reason = f"no vLLM server at {url} ({exc}); start one: scripts/vllm-dev.sh start"
        if os.environ.get("GPUJOBS_TEST_VLLM_REQUIRED"):  # CI started it: absent is a failure
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def vllm() -> Vllm:
    return Vllm(CHAT_URL, served_model(CHAT_URL), EMBED_URL, served_model(EMBED_URL))


def run_client(endpoint: str, requests: list[BatchRequest]) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}

    async def go() -> None:
        retry = RetryPolicy(max_retries=2, backoff_s=0.1, backoff_max_s=1.0)
        async with InferenceClient(endpoint, concurrency=4, timeout_s=120, retry=retry) as client:
            await client.run(requests, lambda o: outcomes.__setitem__(o.custom_id, o))

    asyncio.run(go())
    return outcomes


def chat_rows(model: str) -> list[dict[str, Any]]:
    """Chat and completion requests, one with a bad max_tokens (400) and one for a model the
    server does not have (404)."""
    rows: list[dict[str, Any]] = []
    for i in range(6):
        messages = [{"role": "user", "content": f"question {i}: what is a GOP?"}]
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 6}
        rows.append({"custom_id": f"chat-{i}", "url": "/v1/chat/completions", "body": body})
    rows.append(
        {
            "custom_id": "complete-0",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": "def transcode(", "max_tokens": 5},
        }
    )
    rows.append(
        {
            "custom_id": "bad-max-tokens",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "max_tokens": -3,
                "messages": [{"role": "user", "content": "hi"}],
            },
        }
    )
    rows.append(
        {
            "custom_id": "no-such-model",
            "url": "/v1/completions",
            "body": {"model": "no-such-model", "prompt": "hi", "max_tokens": 2},
        }
    )
    return [{"method": "POST", **row} for row in rows]  # fmt: skip


def embed_rows(model: str) -> list[dict[str, Any]]:
    rows = [{"custom_id": f"embed-{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": model, "input": f"a sentence about rendition {i}"}}
            for i in range(5)]  # fmt: skip
    rows.append({"custom_id": "embed-no-model", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": "no-such-model", "input": "x"}})  # fmt: skip
    return rows


def as_requests(rows: list[dict[str, Any]]) -> list[BatchRequest]:
    return [BatchRequest(i, r["custom_id"], r["url"], r["body"]) for i, r in enumerate(rows)]


def check_chat_lines(lines: dict[str, dict[str, Any]], model: str) -> None:
    """What vLLM answers the chat_rows: text with usage, and its own error bodies."""
    for i in range(6):
        line = lines[f"chat-{i}"]
        assert line["error"] is None, line
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["model"] == model
        assert body["object"] == "chat.completion"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        usage = body["usage"]
        assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    completion = lines["complete-0"]["response"]["body"]
    assert (
        completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 5
    )
    bad = lines["bad-max-tokens"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["type"] == "BadRequestError"
    assert "max_tokens" in bad["error"]["message"]
    missing = lines["no-such-model"]
    assert missing["response"]["status_code"] == 404
    assert missing["error"]["message"].startswith("The model `no-such-model` does not exist")


def test_batch_client_against_vllm(vllm: Vllm) -> None:
    outcomes = run_client(vllm.chat_url, as_requests(chat_rows(vllm.chat_model)))
    check_chat_lines({cid: o.line for cid, o in outcomes.items()}, vllm.chat_model)
    assert sorted(c for c, o in outcomes.items() if o.failed) == ["bad-max-tokens", "no-such-model"]
    assert outcomes["chat-0"].usage["completion_tokens"] == 6

    embeds = run_client(vllm.embed_url, as_requests(embed_rows(vllm.embed_model)))
    for i in range(5):
        body = embeds[f"embed-{i}"].line["response"]["body"]
        assert len(body["data"][0]["embedding"]) == 384  # all-MiniLM-L6-v2's dimension
        assert body["usage"]["prompt_tokens"] > 0
    assert embeds["embed-no-model"].failed
    assert embeds["embed-no-model"].line["response"]["status_code"] == 404


def write_batch(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_whole_jobs_through_a_worker(
    vllm: Vllm, client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    chat_file = write_batch(settings.media / "chat.jsonl", chat_rows(vllm.chat_model))
    embed_file = write_batch(settings.media / "embed.jsonl", embed_rows(vllm.embed_model))
    start_worker("--queues", "inference")
    chat_job = client.submit_inference(chat_file, endpoint=vllm.chat_url, max_concurrency=4,
                                       chunk_size=4)  # fmt: skip
    embed_job = client.submit_inference(embed_file, endpoint=vllm.embed_url)

    record = chat_job.wait(timeout=JOB_S)
    assert record.state is JobState.SUCCEEDED, record.error
    spec = InferenceSpec.model_validate(record.spec)
    lines = [json.loads(x) for x in (settings.media / spec.output).read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in chat_rows("m")]
    check_chat_lines({line["custom_id"]: line for line in lines}, vllm.chat_model)
    assert record.result is not None
    assert record.result["request_counts"] == {"total": 9, "completed": 7, "failed": 2}
    assert record.result["tokens"]["completion"] == 6 * 6 + 5  # from vLLM's usage
    errors = (settings.media / spec.errors_output).read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in errors] == ["bad-max-tokens", "no-such-model"]

    record = embed_job.wait(timeout=JOB_S)
    assert record.state is JobState.SUCCEEDED, record.error
    assert record.result is not None
    assert record.result["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert record.result["tokens"]["prompt"] > 0


def test_openai_batch_api_over_vllm(
    vllm: Vllm, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    start_worker: Callable[..., WorkerProcess],
) -> None:  # fmt: skip
    monkeypatch.setenv("GPUJOBS_VLLM_ENDPOINT", vllm.chat_url)
    api = ApiProcess({**os.environ, "GPUJOBS_API_KEY": API_KEY}, tmp_path / "api.log").start()
    try:
        start_worker("--queues", "inference")
        oa = openai.OpenAI(base_url=api.base_url, api_key=API_KEY, max_retries=0)
        rows = [r for r in chat_rows(vllm.chat_model) if r["url"] == "/v1/chat/completions"]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        upload = oa.files.create(file=("chat.jsonl", data), purpose="batch")
        batch = oa.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
        done = wait_status(oa, batch.id, {"completed", "failed", "cancelled", "expired"})
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
        assert done.usage is not None and done.usage.output_tokens == 36
        assert done.output_file_id and done.error_file_id
        out = oa.files.content(done.output_file_id).text.splitlines()
        assert [json.loads(x)["custom_id"] for x in out] == [f"chat-{i}" for i in range(6)]
        failed = json.loads(oa.files.content(done.error_file_id).text)
        assert failed["custom_id"] == "bad-max-tokens"
        assert failed["response"]["status_code"] == 400
    finally:
        api.stop()
