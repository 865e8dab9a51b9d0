"""vLLM's --api-key: the worker's setting GPUJOBS_VLLM_API_KEY is sent as a bearer token.

Against the real HTTP server of tests/openai_server.py, which answers every /v1 route without
the right `Authorization: Bearer` header with vLLM's 401, and /health without one (the probes);
end to end through a real worker process, as the vLLM pod's inference worker gets the key from
the Secret gpujobs-vllm. The key is the worker's: the producer never has it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs.config import Settings
from tests.helpers import WorkerProcess
from tests.openai_server import FakeOpenAI
from workers.inference.client import BatchRequest, InferenceClient, Outcome, RetryPolicy

KEY = "k-0123456789abcdef"


def send(endpoint: str, api_key: str | None) -> Outcome:
    outcomes: list[Outcome] = []
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}

    async def go() -> None:
        async with InferenceClient(
            endpoint, api_key=api_key, retry=RetryPolicy(max_retries=0)
        ) as client:
            await client.wait_for_server(10)
            request = BatchRequest(0, "c0", "/v1/chat/completions", body)
            await client.run([request], outcomes.append)

    asyncio.run(go())
    [outcome] = outcomes
    return outcome


def test_the_key_is_sent_and_a_missing_or_wrong_key_is_refused() -> None:
    with FakeOpenAI(api_key=KEY) as server:
        ok = send(server.url, KEY)
        assert not ok.failed and ok.line["response"]["status_code"] == 200
        for wrong in (None, "not-the-key"):
            outcome = send(server.url, wrong)
            assert outcome.failed and outcome.line["response"]["status_code"] == 401, wrong
        assert [e.status for e in server.log] == [200]  # the refused ones never got through


def test_the_setting_is_a_secret_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUJOBS_VLLM_API_KEY", KEY)
    settings = Settings()
    assert settings.vllm_api_key is not None
    assert settings.vllm_api_key.get_secret_value() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    monkeypatch.delenv("GPUJOBS_VLLM_API_KEY")
    assert Settings().vllm_api_key is None


def test_a_worker_with_the_key_runs_a_batch_against_a_server_that_wants_it(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"q{i}"}]}}
            for i in range(6)]  # fmt: skip
    batch = tmp_path / "keyed.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeOpenAI(api_key=KEY) as server:
        start_worker("--queues", "inference", env={"GPUJOBS_VLLM_API_KEY": KEY})
        producer = {k: v for k, v in os.environ.items() if k != "GPUJOBS_VLLM_API_KEY"}
        done = subprocess.run(
            [sys.executable, "-m", "gpujobs", "infer", str(batch), "--endpoint", server.url,
             "--wait"], capture_output=True, text=True, timeout=120, env=producer, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "6 completed, 0 failed" in done.stdout
        assert sorted(e.key for e in server.log if e.status == 200) == [f"q{i}" for i in range(6)]
