"""Settings: every knob of gpujobs in one place, read from the environment (prefix GPUJOBS_).

A producer, a worker and the local stack all build the same `Settings`; whatever differs between
machines (the broker's address, where the media root is mounted) comes from the environment or,
in Kubernetes, from a ConfigMap and a Secret.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Codec = Literal["h264", "hevc"]
Preset = Literal["p1", "p2", "p3", "p4", "p5", "p6", "p7"]
AudioMode = Literal["copy", "aac", "none"]


def _default_state_dir() -> Path:
    """XDG_STATE_HOME/gpujobs, else ~/.local/state/gpujobs."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpujobs"


class Settings(BaseSettings):
    """All configuration. Each field reads GPUJOBS_<FIELD> from the environment."""

    # An empty variable is an unset one (an empty Secret value, `GPUJOBS_MEDIA_ROOT=`): never
    # an empty key that opens a port, nor a folder that is the current directory. Numbers are
    # finite.
    model_config = SettingsConfigDict(
        env_prefix="GPUJOBS_", extra="ignore", env_ignore_empty=True, allow_inf_nan=False
    )

    broker_url: str | None = Field(
        default=None,
        description="Redis/Valkey URL of the broker. Unset: the embedded local stack is used.",
    )
    result_url: str | None = Field(
        default=None, description="Redis URL for Celery results. Unset: same as broker_url."
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="Password for the broker, kept out of URLs and logs (Kubernetes Secret).",
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where the local stack keeps Valkey's data, its pid file and logs.",
    )
    media_root: Path | None = Field(
        default=None,
        description="Folder shared by producers and workers; every job path lies under it. "
        "Unset: <state_dir>/media.",
    )
    ffmpeg: str | None = Field(
        default=None,
        description="ffmpeg binary. Unset: the one imageio-ffmpeg ships (never whichever `ffmpeg` "
        "is first on PATH: builds differ in what they accept).",
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="Name of this node in job records and queue names (Kubernetes: spec.nodeName).",
    )

    # Transcode defaults: the command teams run today.
    default_height: int = Field(default=480, gt=0, le=8192)
    default_codec: Codec = "h264"
    default_preset: Preset = "p1"
    default_cq: int = Field(default=28, ge=0, le=51)
    default_audio: AudioMode = "copy"
    default_threads: int = Field(default=2, ge=1, le=64)

    visibility_timeout_s: int = Field(
        default=12 * 3600,
        gt=0,
        description="Seconds before Redis redelivers an unacknowledged job; longer than the "
        "longest job, so a slow job is not run twice. Default 12 h.",
    )
    progress_interval_s: float = Field(
        default=0.25, ge=0, description="Least seconds between two progress updates of one job."
    )
    record_ttl_s: int = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="Seconds a finished job's record is kept (default 7 days); outputs never "
        "expire.",
    )
    lease_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a running job's lease lasts without renewal (renewed every third, "
        "by one thread per worker process for all its jobs). A dead worker's job is requeued "
        "at most lease_s + watchdog_interval_s after it died (12 s by default). Cost: one "
        "renewal script per running job every lease_s / 3; a worker stalled (or cut off from "
        "Redis) longer than lease_s loses its job to another. Default 10.",
    )
    watchdog_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between two watchdog rounds (one winner per round, a SET NX per "
        "worker per round). Default 2.",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Attempts before a job that keeps losing its worker fails."
    )
    shutdown_grace_s: float = Field(
        default=25.0,
        ge=0,
        description="Seconds a worker told to stop (SIGTERM) lets a running job finish before "
        "it requeues it; keep it below the pod's terminationGracePeriodSeconds. Default 25.",
    )
    retry_backoff_s: float = Field(
        default=2.0,
        ge=0,
        description="First delay in seconds before a transient failure is retried; doubles "
        "with each attempt, at most 60 s.",
    )
    connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        description="Seconds to wait for the broker before saying it is unreachable.",
    )

    # GPU workers (workers/supervisor.py, nvenc.py, heartbeat.py).
    nvenc_sessions: int | None = Field(
        default=8,
        ge=0,
        description="Concurrent NVENC encodes per node: GeForce drivers allow 8 sessions per "
        "system. 0 (or None): unlimited, for datacenter cards (L20) that have no limit. Default 8.",
    )
    nvenc_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an NVENC slot is held without renewal (renewed every third while the "
        "encode runs): a dead worker's slot comes back this long after it died. Default 30.",
    )
    nvenc_wait_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a job that found every NVENC slot taken waits before it is tried "
        "again (it goes back to its queue; not a failure). Default 5.",
    )
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between two node heartbeats. Default 5."
    )
    heartbeat_ttl_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a node heartbeat lives; `gpujobs worker --check` fails once the "
        "newest is older (liveness probe). Default 30.",
    )
    vllm_endpoint: str = Field(
        default="http://localhost:9999/v1",
        description="OpenAI-compatible base URL of the node's vLLM server (checked by doctor).",
    )
    vllm_api_key: SecretStr | None = Field(
        default=None,
        description="The key vLLM was started with (`--api-key`), sent by the inference worker "
        "as `Authorization: Bearer <key>` with every request; in Kubernetes from the Secret "
        "gpujobs-vllm. Unset: no header (a server without a key).",
    )

    split_min_piece_s: float = Field(
        default=30.0,
        gt=0,
        description="Shortest piece, in seconds, that `--split auto` cuts a video into: shorter "
        "pieces spend more on starting encoders and joining than they save. Default 30.",
    )

    # Batch inference (gpujobs/batch.py, workers/inference/). The endpoint is vllm_endpoint.
    inference_concurrency: int = Field(
        default=10,
        ge=1,
        description="Requests in flight per chunk: the server's --max-num-seqs. Default 10.",
    )
    inference_adaptive: bool = Field(
        default=True,
        description="Follow the server's load (vLLM's /metrics, latency, 429/503): the workers "
        "sending to one server share a window of requests in flight, raised by one while "
        "nothing waits, cut by a quarter when requests wait. The concurrency is where it "
        "starts. False: a fixed concurrency per chunk. Default true.",
    )
    inference_chunk_size: int = Field(
        default=250,
        ge=1,
        description="Requests per chunk task; chunks are what several workers share. Large "
        "enough that the tail of a chunk (fewer than `concurrency` in flight) costs little. "
        "Default 250.",
    )
    inference_request_timeout_s: float = Field(
        default=600.0, gt=0, description="Seconds one request may take. Default 600."
    )
    inference_max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries of a request after 429, 5xx or a connection error. Default 5.",
    )
    inference_server_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a chunk waits for the server to answer /health (else /v1/models) "
        "before the job fails. Default 120.",
    )
    inference_backoff_s: float = Field(
        default=0.5,
        gt=0,
        description="First retry delay in seconds; doubles per retry, plus up to as much again "
        "of random jitter, at most inference_backoff_max_s. Retry-After wins when sent.",
    )
    inference_backoff_max_s: float = Field(
        default=30.0, gt=0, description="Longest wait in seconds between two retries. Default 30."
    )
    inference_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a chunk's lease lasts without renewal (renewed every third). A "
        "redelivered chunk waits while a live worker holds it. Default 30.",
    )

    # Monitoring (gpujobs/monitor/).
    flower_address: str = Field(
        default="127.0.0.1",
        description="Address Flower listens on. Beyond loopback it refuses to start without "
        "flower_user and flower_password. Default 127.0.0.1.",
    )
    flower_port: int = Field(
        default=5555, ge=0, le=65535, description="Flower's port; 0: any free one. Default 5555."
    )
    flower_user: str | None = Field(default=None, description="Flower basic-auth user name.")
    flower_password: SecretStr | None = Field(
        default=None, description="Flower basic-auth password (Kubernetes Secret)."
    )
    flower_state_save_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between two saves of Flower's state (and on exit) to "
        "<state_dir>/flower. Default 60.",
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="Address the Prometheus endpoint listens on."
    )
    metrics_port: int = Field(
        default=9808, ge=0, le=65535, description="Port of `gpujobs metrics`. Default 9808."
    )

    # The OpenAI Batch API (gpujobs/api/, `gpujobs api`).
    api_address: str = Field(
        default="127.0.0.1",
        description="Address `gpujobs api` listens on. Beyond loopback it refuses to start "
        "without api_key. Default 127.0.0.1.",
    )
    api_port: int = Field(
        default=8090, ge=0, le=65535, description="Port of `gpujobs api`. Default 8090."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The key clients send as `Authorization: Bearer KEY` (Kubernetes Secret). "
        "Unset: no key is asked for, and the API listens on loopback only.",
    )
    api_max_file_bytes: int = Field(
        default=200 * 1024 * 1024,
        gt=0,
        description="Largest file `POST /v1/files` takes, in bytes (OpenAI's limit). Default "
        "200 MiB.",
    )

    @field_validator("redis_password", "vllm_api_key", "flower_password", "api_key")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty secret is no secret: what asks for one (`gpujobs api` beyond loopback)
        refuses to start without it, never runs open with an empty key."""
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _fill_media_root(self) -> Settings:
        if self.media_root is None:
            self.media_root = self.state_dir / "media"
        self.media_root = Path(os.path.abspath(os.path.expanduser(self.media_root)))
        self.state_dir = Path(os.path.abspath(os.path.expanduser(self.state_dir)))
        return self

    @property
    def media(self) -> Path:
        """The media root as an absolute path (never None after validation)."""
        assert self.media_root is not None
        return self.media_root

    @property
    def embedded(self) -> bool:
        """True when no broker is configured and the local stack serves this machine."""
        return self.broker_url is None

    def ffmpeg_binary(self) -> str:
        """The ffmpeg to run: GPUJOBS_FFMPEG, else imageio-ffmpeg's build, so every worker runs
        the same build whatever is on PATH."""
        if self.ffmpeg:
            return self.ffmpeg
        import imageio_ffmpeg  # the worker extra; producers never reach this

        return str(imageio_ffmpeg.get_ffmpeg_exe())


def settings_error(exc: BaseException) -> str | None:
    """One line for a setting that does not validate ("GPUJOBS_LEASE_S: Input should be greater
    than 0, got '-5'"), naming its environment variable; None when `exc` is anything else."""
    if not isinstance(exc, ValidationError) or exc.title != Settings.__name__:
        return None
    errors = exc.errors()
    first = errors[0]
    where = first["loc"]
    name = f"GPUJOBS_{str(where[0]).upper()}" if where else "settings"
    got = f", got {first['input']!r}" if where else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{name}: {first['msg']}{got}{more}"
