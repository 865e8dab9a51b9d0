"""Batch files: checked in full before anything is queued, split into chunks, queued by name.

Bad input gets one line that names the line and the problem, a non-zero exit code, no
traceback, and nothing queued; checked through the CLI as a user runs it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import redis

from gpujobs import InvalidSpec, keys
from gpujobs.app import INFERENCE_QUEUE
from gpujobs.batch import BATCHES, prepare_batch, read_batch_file
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import InferenceSpec, JobKind, JobState

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def gpujobs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True,
        timeout=timeout, env=dict(os.environ), check=False,
    )  # fmt: skip


def line(custom_id: str = "a", **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }  # fmt: skip
    request.update(overrides)
    return request


def vision(url: str, custom_id: str = "v") -> dict[str, Any]:
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": url}}]  # fmt: skip
    return line(custom_id, body={"model": "m", "messages": [{"role": "user", "content": content}]})


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def assert_nothing_queued(broker_url: str, media: Path) -> None:
    r = redis.Redis.from_url(broker_url)
    assert not r.keys(keys.job("*"))
    assert sum(r.llen(name) for name in keys.queue_lists(INFERENCE_QUEUE)) == 0
    assert not (media / BATCHES).exists()


def bad_cases(media: Path, tmp_path: Path) -> list[tuple[list[Any], list[str], str]]:
    """(file lines, extra CLI args, expected message) for every bad input the issue lists."""
    (media / "img").mkdir(exist_ok=True)
    (media / "img" / "ok.png").write_bytes(PNG)
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    (media / "img" / "notes.png").write_text("not an image")
    return [
        ([], [], "is empty (no requests)"),
        (["", "   "], [], "is empty (no requests)"),
        ([line("a"), '{"custom_id": "b", "method": '], [], "line 2: not valid JSON"),
        ([{"method": "POST", "url": "/v1/completions", "body": {}}], [],
         "line 1: custom_id is missing"),
        ([line("a"), line("b"), line("a")], [], "line 3: custom_id 'a' repeats line 1"),
        ([line("a", method="GET")], [], "line 1: method 'GET' is not supported (only POST)"),
        ([line("a"), line("b", url="/v1/foo")], [],
         "line 2: url '/v1/foo' is not supported (use /v1/chat/completions"),
        ([line("a", body=[1, 2])], [], "line 1: body must be a JSON object, got a list"),
        ([[1, 2]], [], "line 1: must be a JSON object, got a list"),
        ([vision(str(outside))], [], f"line 1: image {outside} is outside the media root"),
        ([vision("img/none.png")], [], "line 1: image img/none.png does not exist"),
        ([vision("file:///etc/hostname")], [], "line 1: image /etc/hostname is outside"),
        ([vision("img/notes.png")], [], "line 1: image img/notes.png is not a PNG, JPEG"),
        ([vision("s3://bucket/cat.png")], [], "has an unsupported scheme"),
        ([line("a")], ["--concurrency", "0"], "max_concurrency: Input should be greater than"),
        ([line("a")], ["--request-timeout", "inf"], "request_timeout_s: Input should be a finite"),
        ([line("a")], ["--server-wait", "nan"], "server_wait_s: Input should be a finite number"),
        ([line("a")], ["--wait", "--timeout", "nan"], "'--timeout': must be a finite number"),
        ([line("a")], ["--endpoint", "ftp://host/v1"], "endpoint: must be an http(s) URL"),
        ([line("a")], ["--endpoint", "http://me:s3cret@host:9999/v1"],
         "endpoint: must not hold a user or password"),
        ([line("a")], ["-o", str(tmp_path / "x.jsonl")], "is outside the media root"),
        ([line("a")], ["-o", str(media / "results.txt")], "output must end in .jsonl"),
    ]  # fmt: skip


def test_bad_batches_through_the_cli(settings: Settings, broker_url: str, tmp_path: Path) -> None:
    media = settings.media
    for number, (rows, args, message) in enumerate(bad_cases(media, tmp_path)):
        batch = write_jsonl(tmp_path / f"bad-{number}.jsonl", rows)
        command = "infer" if args else ("submit", "infer")[number % 2]
        result = gpujobs(command, str(batch), *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (rows, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            rows, result.stderr)  # fmt: skip
        assert "Traceback" not in result.stdout + result.stderr
    assert_nothing_queued(broker_url, media)


def test_submit_options_that_are_not_for_batches(
    settings: Settings, broker_url: str, tmp_path: Path
) -> None:
    batch = write_jsonl(tmp_path / "b.jsonl", [line("a")])
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\x00")
    cases = [
        (["submit", str(batch), "--height", "720"], "--height does not apply to a batch file"),
        (["submit", str(batch), str(video)], "batch files (.jsonl) and videos go in separate"),
        (["infer", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
    ]
    for args, message in cases:
        result = gpujobs(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert_nothing_queued(broker_url, settings.media)


def test_an_earlier_runs_results_are_not_replaced_unasked(
    settings: Settings, broker_url: str
) -> None:
    batch = write_jsonl(settings.media / "runs/b.jsonl", [line("a")])
    for written in ("runs/b.results.jsonl", "runs/b.results.errors.jsonl"):
        results = settings.media / written
        results.write_text("earlier\n")
        for command in ("infer", "submit"):
            result = gpujobs(command, str(batch))
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip() == (
                f"error: output {written} exists (use --overwrite to replace it)"
            )
        assert results.read_text() == "earlier\n"
        prepared = prepare_batch(settings, batch, overwrite=True)  # asked: taken
        assert prepared.spec.output == "runs/b.results.jsonl" and prepared.spec.overwrite
        results.unlink()
    assert_nothing_queued(broker_url, settings.media)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps(line("a")) + "\n\n" + json.dumps(line("a")) + "\n")
    with pytest.raises(InvalidSpec, match="line 3: custom_id 'a' repeats line 1"):
        read_batch_file(batch, tmp_path)


def test_submit_checks_splits_and_queues(client: Client, settings: Settings) -> None:
    media = settings.media
    (media / "img").mkdir()
    (media / "img" / "cat.png").write_bytes(PNG)
    rows = [line(f"r{i}") for i in range(7)]
    rows[2] = vision(str(media / "img" / "cat.png"), "r2")  # absolute: rewritten relative
    rows[3] = vision(f"file://{media}/img/cat.png", "r3")
    rows[4] = vision("https://example.com/x.jpg", "r4")
    source = write_jsonl(media / "in" / "prompts.jsonl", rows)
    job = client.submit_inference(source, endpoint="http://gpu-node:9999/v1/", chunk_size=3)

    record = job.status()
    assert record.kind is JobKind.INFERENCE and record.state is JobState.QUEUED
    spec = InferenceSpec.model_validate(record.spec)
    assert spec.endpoint == "http://gpu-node:9999/v1" and spec.requests == 7
    assert spec.output == "in/prompts.results.jsonl"
    assert spec.errors_output == "in/prompts.results.errors.jsonl"
    assert spec.input == f"{BATCHES}/{job.id}/requests.jsonl"
    assert spec.max_concurrency == 10 and spec.model is None
    assert record.result and record.result["request_counts"] == {
        "total": 7, "completed": 0, "failed": 0}  # fmt: skip
    written = [json.loads(x) for x in (media / spec.input).read_text().splitlines()]
    assert [w["custom_id"] for w in written] == [f"r{i}" for i in range(7)]
    urls = [w["body"]["messages"][0]["content"][1]["image_url"]["url"] for w in written[2:5]]
    assert urls == ["img/cat.png", "img/cat.png", "https://example.com/x.jpg"]
    # Three chunks, queued by name on `inference`, each knowing where its lines start.
    raw = [client.redis.lindex(name, 0) for name in keys.queue_lists(INFERENCE_QUEUE)]
    messages = [
        json.loads(m)
        for name in keys.queue_lists(INFERENCE_QUEUE)
        for m in client.redis.lrange(name, 0, -1)
    ]
    assert any(raw)
    args = sorted(json.loads(base64.b64decode(m["body"]))[0] for m in messages)
    assert [a[1:4] for a in args] == [[0, 0, 3], [1, 3, 3], [2, 6, 1]]
    data = (media / spec.input).read_bytes()
    for _, _, start, _, offset in args:
        assert json.loads(data[offset:].split(b"\n", 1)[0])["custom_id"] == f"r{start}"
    assert all(m["headers"]["task"] == "gpujobs.inference_chunk" for m in messages)
    assert client.redis.hget(keys.batch_stats(job.id), "chunks") == "3"


def test_sdk_takes_a_list_and_names_the_bad_item(client: Client, settings: Settings) -> None:
    job = client.submit_inference([line("a"), line("b", url="/v1/embeddings",
                                                    body={"input": "x"})])  # fmt: skip
    spec = InferenceSpec.model_validate(job.status().spec)
    assert spec.source == "2 requests"
    assert spec.output == f"{BATCHES}/{job.id}/batch.results.jsonl"
    with pytest.raises(InvalidSpec, match="item 2: custom_id 'a' repeats item 1"):
        client.submit_inference([line("a"), line("a")])
    with pytest.raises(InvalidSpec, match="the batch is empty"):
        client.submit_inference([])
    with pytest.raises(InvalidSpec, match=r"item 1: body\.x is of type object, which JSON"):
        client.submit_inference([line("a", body={"x": object()})])
    with pytest.raises(InvalidSpec, match="chunk_size: Input should be greater than or equal"):
        client.submit_inference([line("a")], chunk_size=0)


def test_a_large_batch_is_checked_without_being_held_in_memory(
    settings: Settings, tmp_path: Path
) -> None:
    prompt = "x" * 4000
    rows = [line(f"r{i}", url="/v1/completions", body={"model": "m", "prompt": prompt})
            for i in range(1500)]  # fmt: skip
    source = write_jsonl(tmp_path / "large.jsonl", rows)  # 6 MB
    tracemalloc.start()
    try:
        prepared = prepare_batch(settings, source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.spec.requests == 1500
    assert peak < 2_000_000, peak  # a line at a time, and the custom_ids seen


def test_a_batch_file_changed_after_its_check_is_refused(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "b.jsonl", [line("a"), line("b")])
    prepared = prepare_batch(settings, source)
    with source.open("a") as handle:
        handle.write(json.dumps(line("c")) + "\n")
    with pytest.raises(InvalidSpec, match=r"changed while it was queued \(3 requests, 2 checked"):
        client.enqueue_batch(prepared)
    write_jsonl(source, [line("a"), "{oops"])
    with pytest.raises(InvalidSpec, match="line 2: not valid JSON"):
        client.enqueue_batch(prepared)
    assert not client.redis.keys(keys.job("*"))
    assert not (settings.media / BATCHES / prepared.job_id).exists()


def test_the_errors_file_may_not_overwrite_the_input(client: Client, settings: Settings) -> None:
    # Rerunning the failed lines of a batch into its own output would replace them.
    source = write_jsonl(settings.media / "in" / "x.results.errors.jsonl", [line("a")])
    with pytest.raises(InvalidSpec, match=r"errors file of output in/x\.results\.jsonl would"):
        client.submit_inference(source, output=settings.media / "in" / "x.results.jsonl")
