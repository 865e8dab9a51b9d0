"""Flower in the embedded local stack: `gpujobs up` starts it and prints its URL, `down` stops
it (Flower saves its state on the way out)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.helpers import wait_for


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "healthcheck", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_starts_flower_and_prints_its_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env["GPUJOBS_STATE_DIR"] = str(tmp_path / "state")
    env["GPUJOBS_FLOWER_PORT"] = "0"  # any free port: tests may run side by side
    up = run(env, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        found = re.search(r"^flower (http://127\.0\.0\.1:\d+/)$", up.stdout, re.MULTILINE)
        assert found, up.stdout
        url = found.group(1)
        # Flower starts beside the worker; the stack does not wait for it.
        wait_for(lambda: _answers(url), timeout_s=30, interval_s=0.2)
        # On loopback without credentials it is open, as configured.
        assert httpx.get(url + "tasks", timeout=5).status_code == 200
        stack = json.loads((tmp_path / "state" / "stack.json").read_text())
        assert stack["flower_url"] == url
        flowers = [
            child
            for child in psutil.Process(stack["pid"]).children()
            if "flower" in child.cmdline()
        ]
    finally:
        down = run(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    _, alive = psutil.wait_procs(flowers, timeout=10)
    assert flowers and not alive
    assert list((tmp_path / "state" / "flower").glob("flower.db*")), "state saved on stop"
