"""A newcomer's first hour (issue 16): what the CLI says, as a user runs it, a real process each.

Help that answers questions, output fit for scripts and 80 columns, messages that say what
happened, `retry`, `clean`, and the worker's log and Flower's task list telling the truth.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from rich.console import Console

from gpujobs import keys
from gpujobs.cli.render import JobBars
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import WorkerProcess, wait_for
from workers import heartbeat


def gpujobs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def queued_ids(broker_url: str) -> list[str]:
    """Every job id with a record (any state), oldest first."""
    r = redis.Redis.from_url(broker_url, decode_responses=True)
    found = {str(k).rsplit(":", 1)[-1]: float(r.hget(k, "created_at") or 0)
             for k in r.keys(keys.job("*"))}  # fmt: skip
    return sorted(found, key=found.__getitem__)


@pytest.fixture
def video(media_clip: Callable[..., Path]) -> Path:
    return media_clip("v/clip.mp4", seconds=1, size="320x240")


def test_version_and_help_that_answers_questions(settings: Settings) -> None:
    version = gpujobs("--version")
    assert version.returncode == 0 and version.stdout.startswith("gpujobs 0."), version
    helps = {name: gpujobs(name, "--help", env={"COLUMNS": "80"}).stdout
             for name in ("submit", "ls", "watch", "retry", "clean", "worker")}  # fmt: skip
    submit = helps["submit"]
    for shown in ("--height PIXELS", "[default: 480]", "--preset p1..p7", "[default: p1]",
                  "--cq 0..51", "[default: 28]", "--priority 0..9", "[default: 5]",
                  "--gpu auto|require|forbid", "[default: auto]", "[default: copy]"):  # fmt: skip
        assert shown in submit, (shown, submit)
    assert "[default: 20;" in helps["ls"] and "[default: 2.0" in helps["clean"]
    for name, text in helps.items():
        assert "<bool>" not in text and "<int" not in text and " ." not in text, (name, text)
        for line in text.splitlines():
            assert len(line) <= 80 and not re.search(r"[a-z]-$", line), (name, line)


def test_a_bogus_state_is_answered_in_plain_words(settings: Settings) -> None:
    result = gpujobs("ls", "--state", "bogus")
    assert result.returncode == 2 and result.stdout == ""  # a usage error, as Click's own
    assert result.stderr == (
        "error: no state 'bogus': a job is queued, running, succeeded, failed or cancelled\n"
    )


def test_ls_json_is_an_array_and_jsonl_streams(settings: Settings, video: Path) -> None:
    empty = gpujobs("ls", "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    assert gpujobs("ls", "--jsonl").stdout == ""
    client = Client(settings)
    ids = [client.submit_transcode(video, height=h).id for h in (120, 240)]
    listed = json.loads(gpujobs("ls", "--json").stdout)
    assert [r["id"] for r in listed] == ids[::-1]  # newest first
    lines = gpujobs("ls", "--jsonl").stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids[::-1]


def test_resubmission_says_already_queued(settings: Settings, video: Path, broker_url: str) -> None:
    first = gpujobs("submit", str(video), "--height", "120")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.split()[1]
    again = gpujobs("submit", str(video), "--height", "120")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"already queued as {job_id}  v/clip.mp4")
    assert queued_ids(broker_url) == [job_id]


def test_gpu_require_without_a_gpu_worker_is_refused_at_submit(
    settings: Settings, video: Path, broker_url: str
) -> None:
    r = redis.Redis.from_url(broker_url)
    cpu_beat = heartbeat.make_heartbeat("cpu-node", [], ["gpujobs@cpu-node"], [], 0)
    heartbeat.publish(r, cpu_beat, ttl_s=60)
    refused = gpujobs("submit", str(video), "--gpu", "require")
    assert refused.returncode != 0
    [line] = refused.stderr.splitlines()
    assert line.startswith("error: --gpu require: no live worker in the cluster has a GPU")
    assert queued_ids(broker_url) == []
    with pytest.raises(Exception, match="no live worker"):  # the SDK refuses it too
        Client(settings).submit_transcode(video, gpu="require")
    gpu = {"index": 0, "name": "NVIDIA L4",
           "capabilities": {"nvenc": True, "cuda_decode": True, "scale_cuda": True}}  # fmt: skip
    gpu_beat = heartbeat.make_heartbeat("gpu-node", [gpu], ["gpujobs@gpu-node.gpu0"], [], 0)  # type: ignore[list-item]
    heartbeat.publish(r, gpu_beat, ttl_s=60)
    accepted = gpujobs("submit", str(video), "--gpu", "require")
    assert accepted.returncode == 0, accepted.stderr
    assert len(queued_ids(broker_url)) == 1


def test_nothing_folds_when_stdout_is_not_a_terminal(settings: Settings, video: Path) -> None:
    deep = video.parent / ("a-rather-long-folder-name-" * 3) / "and-a-long-file-name.mp4"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(video.read_bytes())
    result = gpujobs("submit", str(deep), env={"COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.endswith(str(deep.relative_to(settings.media)))


def test_ls_fits_80_columns(settings: Settings, video: Path) -> None:
    client = Client(settings)
    client.submit_transcode(video, height=120)
    table = gpujobs("ls", env={"COLUMNS": "80"}).stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "STATE", "PROGRESS", "INPUT", "WORKER", "AGE"]
    assert len(table) == 2 and all(len(line) <= 80 for line in table), table


def test_cancelled_job_lists_no_output_and_retry_queues_it_again(
    settings: Settings, video: Path, broker_url: str
) -> None:
    client = Client(settings)
    job = client.submit_transcode(video, height=120, cq=30)
    refused = gpujobs("retry", job.id)  # still queued: nothing to retry
    assert refused.returncode == 1
    assert refused.stderr == (
        f"error: job {job.id} is queued: only a failed or cancelled job is retried\n"
    )
    assert job.cancel()
    shown = gpujobs("status", job.id).stdout
    output_row = next(line for line in shown.splitlines() if line.split()[0] == "output")
    assert "none (cancelled; v/clip.120p.mp4 was not written)" in output_row
    retried = gpujobs("retry", job.id)
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.split()[-1]
    assert retried.stdout.startswith(f"{job.id} (cancelled) queued {new_id}")
    new = client.job(new_id).status()
    assert new.state is JobState.QUEUED and new.spec == job.status().spec
    assert set(queued_ids(broker_url)) == {job.id, new_id}


def test_clean_removes_old_inbox_copies_and_finished_records(
    settings: Settings, video: Path, tmp_path: Path, broker_url: str
) -> None:
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(video.read_bytes())
    client = Client(settings)
    done = client.submit_transcode(outside, height=120)  # copied to inbox/outside.mp4
    live = client.submit_transcode(video, height=240)
    copy = settings.media / "inbox" / "outside.mp4"
    assert copy.exists()
    client.store.update(done.id, state=JobState.FAILED, error="made up")
    keep = gpujobs("clean")  # nothing is 2 days old
    assert keep.stdout.splitlines()[-1] == (
        "removed 0 inbox copies and 0 finished records older than 2 days"
    )
    dry = gpujobs("clean", "--older-than", "0", "--dry-run")
    assert dry.stdout.splitlines() == [
        f"would remove {copy}", f"would remove job {done.id} (failed)",
        "would remove 1 inbox copy and 1 finished record older than 0 days",
    ]  # fmt: skip
    assert copy.exists() and client.store.get(done.id) is not None
    time.sleep(0.05)  # the copy's mtime and the record's finish lie strictly in the past
    cleaned = gpujobs("clean", "--older-than", "0")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not copy.exists() and client.store.get(done.id) is None
    assert client.store.attempts(done.id) == [] and queued_ids(broker_url) == [live.id]
    assert video.exists() and client.store.get(live.id) is not None


def test_ctrl_c_on_submit_wait_says_the_job_goes_on(
    settings: Settings, video: Path, broker_url: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpujobs", "submit", str(video), "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()  # "queued ID  v/clip.mp4": the job is in
    assert first.startswith("queued "), first
    job_id = first.split()[1]
    # Ctrl-C while the command watches (the case under test), not while it is still starting
    # to (importing the progress bars, starting their thread): it has subscribed to the job.
    channel = keys.job_events(job_id)
    r = redis.Redis.from_url(broker_url)
    wait_for(lambda: r.pubsub_numsub(channel)[0][1] == 1, timeout_s=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        f"stopped watching; the job goes on. Watch again with `gpujobs watch {job_id}`, "
        f"stop with `gpujobs cancel {job_id}`"
    )
    assert Client(settings).job(job_id).status().state is JobState.QUEUED


def test_the_first_frame_shows_the_jobs_real_progress() -> None:
    record = JobRecord(
        id="aaaaaaaaaaaa", kind=JobKind.TRANSCODE, state=JobState.RUNNING, percent=42.5,
        spec={"input": "in/a.mp4"}, created_at=time.time(),
    )  # fmt: skip
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    bars = JobBars(console)
    bars.update(record)  # not started: nothing has refreshed in between
    [task] = bars.progress.tasks
    assert task.completed == 42.5
    console.print(bars.progress.get_renderable())
    assert "42.5%" in out.getvalue() and " 0.0%" not in out.getvalue()


@pytest.mark.timeout(300)
def test_expected_failures_are_one_log_line_and_chunks_read_as_such(
    client: Client, settings: Settings, start_worker: Callable[..., WorkerProcess],
    broker_url: str, media_clip: Callable[..., Path],
) -> None:  # fmt: skip
    # An expected failure on the worker: the job requires a GPU and this worker has none
    # (another node's heartbeat has one, so submit takes it; this worker is told to consume
    # the GPU queue, as a worker whose card cannot decode with CUDA does, and picks it up).
    gpu = {"index": 0, "name": "NVIDIA L4",
           "capabilities": {"nvenc": True, "cuda_decode": True, "scale_cuda": True}}  # fmt: skip
    beat = heartbeat.make_heartbeat("gpu-node", [gpu], ["gpujobs@gpu-node.gpu0"], [], 0)  # type: ignore[list-item]
    heartbeat.publish(client.redis, beat, ttl_s=300)
    clip = media_clip("gpu.mp4", seconds=1, size="320x240")
    worker = start_worker("--queues", "transcode,transcode-gpu")
    failed = client.submit_transcode(clip, gpu="require").wait(timeout=120)
    assert failed.state is JobState.FAILED
    wait_for(lambda: "raised expected" in worker.log(), timeout_s=30)
    assert "Traceback" not in worker.log() and "raised unexpected" not in worker.log()

    # What Flower shows as a chunk's arguments travels in the task message itself.
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"input": f"text {i}"}} for i in range(120)]  # fmt: skip
    batch = client.submit_inference(rows, endpoint="http://127.0.0.1:9/v1", chunk_size=50)
    r = redis.Redis.from_url(broker_url)
    messages = [json.loads(m) for name in keys.queue_lists("inference")
                for m in r.lrange(name, 0, -1)]  # fmt: skip
    shown = sorted(m["headers"]["argsrepr"] for m in messages)
    assert shown == [f"batch {batch.id} chunk {i}/3: {n} requests"
                     for i, n in ((1, 50), (2, 50), (3, 20))]  # fmt: skip


def test_the_command_starts_without_celery_redis_or_pydantic() -> None:
    """`gpujobs --help` imports none of the heavy parts; the states it names are JobState's."""
    code = (
        "import sys, gpujobs.cli.main as m; "
        "heavy = [n for n in ('celery', 'redis', 'pydantic', 'kombu', 'httpx') "
        "if n in sys.modules]; "
        "print(heavy, m.STATES)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    assert shown.strip() == f"[] {[state.value for state in JobState]}"
    listed = subprocess.run(
        [sys.executable, "-c", "import sys; from gpujobs.cli.main import main; "
         "sys.argv = ['gpujobs', 'ls']\ntry: main()\nexcept SystemExit: pass\n"
         "print([n for n in ('celery', 'kombu', 'httpx') if n in sys.modules])"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert listed.strip().splitlines()[-1] == "[]", listed  # `ls` makes no Celery app
    helped = subprocess.run(
        [sys.executable, "-c", "import sys; from gpujobs.cli.main import main; "
         "sys.argv = ['gpujobs', '--help']\ntry: main()\nexcept SystemExit: pass\n"
         "print(sorted(n for n in sys.modules if n.startswith(('gpujobs.', 'rich'))))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Commands" in helped and "cluster" in helped
    # Only the group and its table: every other command's module is imported when it runs.
    assert helped.strip().splitlines()[-1] == str(
        [
            "gpujobs.cli",
            "gpujobs.cli.lazy",
            "gpujobs.cli.main",
            "gpujobs.cli.options",
            "gpujobs.errors",
        ]
    ), helped
    import gpujobs

    assert gpujobs.Client is Client and "Client" in dir(gpujobs)
    with pytest.raises(AttributeError):
        _ = gpujobs.Nope  # type: ignore[attr-defined]


def test_the_sdk_copies_an_input_from_outside_the_media_root(
    settings: Settings, video: Path, tmp_path: Path
) -> None:
    """The README's SDK example: a file anywhere is copied into the inbox, as the CLI does."""
    import gpujobs

    outside = tmp_path / "home" / "talk.mp4"
    outside.parent.mkdir()
    outside.write_bytes(video.read_bytes())
    job = gpujobs.submit_transcode(str(outside), height=120)
    assert job.status().spec["input"] == "inbox/talk.mp4"
    assert (settings.media / "inbox" / "talk.mp4").read_bytes() == outside.read_bytes()
    with pytest.raises(gpujobs.InvalidSpec, match="outside the media root"):
        gpujobs.submit_transcode(str(outside), height=240, copy_outside=False)


def test_status_lists_a_batchs_chunk_attempts(client: Client, broker_url: str) -> None:
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"input": f"text {i}"}} for i in range(30)]  # fmt: skip
    batch = client.submit_inference(rows, endpoint="http://127.0.0.1:9/v1", chunk_size=10)
    # What the watchdog records when chunk index 1 (the second) lost its worker twice.
    redis.Redis.from_url(broker_url).hincrby(keys.batch_requeues(batch.id), "1", 2)
    shown = gpujobs("status", batch.id, env={"COLUMNS": "120"})
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert "kind inference" in lines and "chunk 2 resent 2 times: its worker was lost" in lines
    as_json = json.loads(gpujobs("status", batch.id, "--json").stdout)
    assert as_json["attempts"] == [
        {"chunk": 2, "outcome": "resent 2 times: its worker was lost", "resent": 2}
    ]


def test_the_demo_runs_again_and_again(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """`scripts/demo.sh` twice: the second run replaces the demo's own output, not refuses."""
    start_worker()
    outputs = []
    for _ in range(2):
        result = gpujobs("demo", "--seconds", "1", timeout=240)
        assert result.returncode == 0, result.stderr
        [line] = [line for line in result.stdout.splitlines() if line.startswith("output ")]
        assert ": 854x480 h264, audio aac (copied), 1.0 s" in line, result.stdout
        outputs.append(line)
    assert outputs[0] == outputs[1]
