"""Flower for gpujobs: basic auth, the refusal to serve in the open, readable tasks in a real
browser while a real worker transcodes, and state that survives a restart."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from gpujobs.app import task_argsrepr
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.monitor.flower import basic_auth, flower_argv, is_loopback, state_db
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess, wait_for
from workers import heartbeat

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
READY_TIMEOUT_S = 60.0
USER = "ops"


class FlowerProcess:
    """A real `gpujobs flower --port 0`; `start()` returns its URL once it listens."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()

    def start(self) -> FlowerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpujobs", "flower", "--port", "0", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def wait_ready(self) -> str:
        if not self._ready.wait(READY_TIMEOUT_S) or not self.url:
            self.kill()
            raise RuntimeError(f"flower not ready:\n{self.log_path.read_text(errors='replace')}")
        return self.url

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                # Flower logs this right after its socket is bound.
                found = re.search(rb"Visit me at (http://\S+)", line)
                if found:
                    self.url = found.group(1).decode().rstrip("/") + "/"
                    self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        """SIGTERM (Flower saves its state then), bounded."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> str:
    """Credentials in the environment (as a Kubernetes Secret would put them)."""
    value = secrets.token_urlsafe(16)
    monkeypatch.setenv("GPUJOBS_FLOWER_USER", USER)
    monkeypatch.setenv("GPUJOBS_FLOWER_PASSWORD", value)
    return value


@pytest.fixture
def start_flower(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., FlowerProcess]]:
    started: list[FlowerProcess] = []

    def start(*args: str) -> FlowerProcess:
        flower = FlowerProcess(dict(os.environ), tmp_path / f"flower-{len(started)}.log", *args)
        started.append(flower)
        return flower.start()

    yield start
    for flower in started:
        flower.kill()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_argsrepr_is_the_spec_in_brief() -> None:
    spec = {
        "input": "in/talk.mp4",
        "output": "in/talk.480p.mp4",
        "width": None,
        "height": 480,
        "codec": "h264",
        "preset": "p1",
        "cq": 28,
        "audio": "copy",
        "priority": 5,
        "gpu": "auto",
    }
    assert task_argsrepr(spec) == (
        "in/talk.mp4 -> in/talk.480p.mp4 | h264 480p p1 cq28 | audio copy | priority 5 | gpu auto"
    )


def test_loopback_and_auth_rules(settings: Settings) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.5")
    assert basic_auth(settings, "127.0.0.1") is None
    with pytest.raises(Exception, match=r"refusing to serve Flower on 0\.0\.0\.0 without auth"):
        basic_auth(settings, "0.0.0.0")
    secured = settings.model_copy(update={"flower_user": "ops", "flower_password": None})
    with pytest.raises(Exception, match="set both"):
        basic_auth(secured, "127.0.0.1")
    argv = flower_argv(settings, "127.0.0.1", 5555)
    assert "--persistent=True" in argv and f"--db={state_db(settings)}" in argv
    assert "--state_save_interval=60000" in argv and f"--conf={os.devnull}" in argv


def test_flower_refuses_a_public_address_without_auth(settings: Settings) -> None:
    result = run_cli("flower", "--address", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: refusing to serve Flower on 0.0.0.0 without auth: set GPUJOBS_FLOWER_USER and "
        "GPUJOBS_FLOWER_PASSWORD, or listen on 127.0.0.1"
    ]


def test_flower_on_a_taken_port_is_one_line(settings: Settings) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("flower", "--port", str(port))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot serve Flower on 127.0.0.1:{port}: "), result.stderr
    assert "Traceback" not in result.stderr


def test_the_stack_runs_without_flower_it_cannot_bind(settings: Settings) -> None:
    from pydantic import SecretStr

    from gpujobs.monitor.flower import stack_flower

    # 192.0.2.1 (TEST-NET-1): an address this machine does not have.
    update = {"flower_address": "192.0.2.1", "flower_user": USER, "flower_password": SecretStr("p")}
    secured = settings.model_copy(update=update)
    assert stack_flower(secured) is None


def test_flower_pages_answer_401_without_credentials(
    password: str, start_flower: Callable[..., FlowerProcess]
) -> None:
    flower = start_flower()
    url = flower.wait_ready()
    pages = [
        "",
        "workers",
        "tasks",
        "broker",
        "task/0123456789ab",
        "tasks/datatable",
        "api/tasks",
        "api/workers",
        "api/task/info/0123456789ab",
        "api/queues/length",
    ]
    with httpx.Client(base_url=url, timeout=10) as http:
        for page in pages:
            response = http.get(page)
            assert response.status_code == 401, page
            if not page.startswith("api/"):  # the API answers a bare 401, no challenge
                assert response.headers["WWW-Authenticate"] == 'Basic realm="flower"', page
            assert http.get(page, auth=(USER, "wrong")).status_code == 401, page
        assert http.get("tasks", auth=(USER, password)).status_code == 200
        assert http.get("api/tasks", auth=(USER, password)).status_code == 200
    # The password reaches Flower through its environment, never its command line.
    assert flower.proc is not None
    assert password not in " ".join(psutil.Process(flower.proc.pid).cmdline())


def _task_info(http: httpx.Client, task_id: str) -> dict[str, object]:
    response = http.get(f"api/task/info/{task_id}")
    return response.json() if response.status_code == 200 else {}


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)",
)
def test_browser_finds_jobs_on_the_tasks_page(
    client: Client,
    settings: Settings,
    password: str,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    start_flower: Callable[..., FlowerProcess],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    flower = start_flower()  # first: it must see the producers' task-sent events
    start_worker("--queues", "transcode,transcode-gpu,inference")  # takes `require` jobs too
    url = flower.wait_ready()
    http = httpx.Client(base_url=url, auth=(USER, password), timeout=10)

    # Fails on the worker: it asks for a GPU and this worker has none (a file ffmpeg cannot
    # read is refused at submit now, before any queue). Submit refuses `require` when no live
    # worker has a GPU, so another node's heartbeat says it has one; this worker, told to
    # consume the GPU queue, takes the job.
    gpu = {"index": 0, "name": "NVIDIA L4",
           "capabilities": {"nvenc": True, "cuda_decode": True, "scale_cuda": True}}  # fmt: skip
    heartbeat.publish(client.redis, heartbeat.make_heartbeat(
        "gpu-node", [gpu], ["gpujobs@gpu-node.gpu0"], [], 0), ttl_s=300)  # type: ignore[list-item]  # fmt: skip
    failed = client.submit_transcode(
        media_clip("gpu.mp4", seconds=1, size="320x240"), gpu="require"
    )
    done = client.submit_transcode(media_clip("short.mp4", seconds=1, size="320x240"), height=120)
    assert failed.wait(timeout=60).state is JobState.FAILED
    assert done.wait(timeout=60).state is JobState.SUCCEEDED
    long_clip = media_clip("long.mp4", seconds=30, size="1920x1080")
    running = client.submit_transcode(long_clip, preset="p7", height=1080)
    for record in running.watch(timeout=60):
        if record.state is JobState.RUNNING and record.percent > 0:
            break
    queued = client.submit_transcode(long_clip, height=240)  # waits behind the running job
    # Flower learns all this from events; its API is the only way to see when it has.
    wait_for(lambda: _task_info(http, running.id).get("state") == "PROGRESS", timeout_s=20)
    wait_for(
        lambda: _task_info(http, queued.id).get("state") in ("PENDING", "RECEIVED"), timeout_s=20
    )
    wait_for(lambda: _task_info(http, failed.id).get("state") == "FAILURE", timeout_s=20)

    shot = tmp_path / "flower-tasks.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),  # fresh, thrown away after
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            http_credentials={"username": USER, "password": password},
            viewport={"width": 2200, "height": 640},
        )
        try:
            page = browser.new_page()
            response = page.goto(url + "tasks")
            assert response is not None and response.status == 200
            rows = {}
            for job, state in ((running, "PROGRESS"), (done, "SUCCESS"), (failed, "FAILURE")):
                row = page.locator("tr", has_text=job.id)
                row.wait_for(timeout=15_000)
                rows[job.id] = row.inner_text()
                assert state in rows[job.id], rows[job.id]
            queued_row = page.locator("tr", has_text=queued.id)
            queued_row.wait_for(timeout=15_000)
            assert re.search(r"PENDING|RECEIVED", queued_row.inner_text())
            # The kind is the name, the arguments are the spec in brief, progress shows while it
            # runs, and a failure shows the reason gpujobs recorded.
            assert "gpujobs.transcode" in rows[running.id]
            assert "long.mp4 -> long.1080p.mp4 | h264 1080p p7 cq28" in rows[running.id]
            assert re.search(r"\d+\.\d% \| ", rows[running.id]), rows[running.id]
            reason = failed.status().error
            assert reason and "requires a GPU" in reason
            assert reason[:40] in rows[failed.id]
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, DOCS / "flower-tasks.png")

    # Persistent state: saved on SIGTERM, read back by the next Flower.
    running.cancel()
    assert flower.stop() == 0
    assert list(state_db(settings).parent.glob(f"{state_db(settings).name}*"))
    again = start_flower()
    http = httpx.Client(base_url=again.wait_ready(), auth=(USER, password), timeout=10)
    assert _task_info(http, done.id).get("state") == "SUCCESS"
