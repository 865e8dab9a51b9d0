"""The embedded default: no broker configured, `gpujobs submit` starts Valkey and a worker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import psutil
import pytest

from gpujobs.media import probe


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env["GPUJOBS_STATE_DIR"] = str(tmp_path / "state")
    return env


def run(env: dict[str, str], *args: str, cwd: Path | None = None) -> CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(300)
def test_submit_starts_the_local_stack_and_down_stops_it(
    embedded_env: dict[str, str],
    clip_cache: Callable[..., Path],
    tmp_path: Path,
    ffmpeg: str,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(clip_cache(seconds=2, size="1920x1080"), home / "movie.mp4")
    result = run(embedded_env, "submit", "movie.mp4", "--wait", cwd=home)
    assert result.returncode == 0, result.stdout + result.stderr
    state = tmp_path / "state"
    stack = json.loads((state / "stack.json").read_text())
    # One line says the stack was started, where Flower is, and how to stop it.
    [started] = [line for line in result.stderr.splitlines() if "local stack" in line]
    assert started.startswith("started the local stack (Valkey and a worker")
    assert started.endswith("stop it with `gpujobs down`")
    if stack.get("flower_url"):
        assert f"Flower at {stack['flower_url']}" in started
    assert psutil.pid_exists(stack["pid"])
    output = state / "media" / "inbox" / "movie.480p.mp4"
    info = probe(output)
    assert (info.video_codec, info.width, info.height, info.audio_codec) == (
        "h264",
        854,
        480,
        "aac",
    )
    # A second command finds the running stack instead of starting another.
    listed = run(embedded_env, "ls", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["state"] == "succeeded"
    up = run(embedded_env, "up")
    assert stack["broker_url"] in up.stdout and "already up" in up.stdout
    stack_proc = psutil.Process(stack["pid"])
    children = stack_proc.children(recursive=True)
    down = run(embedded_env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert down.stdout.startswith(
        "stopping the local stack: the worker finishes or hands back no running job (up to 25 s)"
    )
    _, alive = psutil.wait_procs([stack_proc, *children], timeout=10)
    assert not alive, "the stack, Valkey and the worker must all be gone"
    assert not (state / "stack.json").exists()
    assert "not running" in run(embedded_env, "down").stdout


def test_commands_that_only_read_do_not_start_the_stack(embedded_env: dict[str, str]) -> None:
    result = run(embedded_env, "ls")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        "error: the local stack is not running (start it with `gpujobs up`)"
    )


def test_down_never_signals_a_process_that_is_not_the_stack(tmp_path: Path) -> None:
    """After a crash or reboot the pid in stack.json may belong to another program."""
    from gpujobs import local
    from gpujobs.config import Settings

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        settings = Settings(state_dir=tmp_path / "state", broker_url=None)
        settings.state_dir.mkdir(parents=True)
        (settings.state_dir / "stack.json").write_text(
            json.dumps({"pid": bystander.pid, "broker_url": "redis://127.0.0.1:1"})
        )
        assert local.stop(settings) is False
        assert bystander.poll() is None, "the bystander must survive"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.timeout(300)
def test_up_returns_once_the_worker_can_take_work(
    embedded_env: dict[str, str], clip_cache: Callable[..., Path]
) -> None:
    """Right after `up`, the liveness probe passes and a job can be sent to this node."""
    up = run(embedded_env, "up")
    try:
        assert up.returncode == 0, up.stderr
        node = socket.gethostname()
        assert f"worker gpujobs-stack@{node} ready" in up.stdout
        assert up.stdout.splitlines()[-1] == "stop it with `gpujobs down`"
        check = run(embedded_env, "worker", "--check")
        assert check.returncode == 0, check.stderr
        clip = Path(embedded_env["GPUJOBS_STATE_DIR"]) / "media" / "x.mp4"
        shutil.copyfile(clip_cache(seconds=1, size="320x240"), clip)
        sent = run(embedded_env, "submit", str(clip), "--node", node)
        assert sent.returncode == 0, sent.stderr
        assert "local stack" not in sent.stderr  # found running: nothing to say
    finally:
        run(embedded_env, "down")
