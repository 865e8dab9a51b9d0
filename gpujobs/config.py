"""Settings: every knob of gpujobs in one place, read from the environment (prefix GPUJOBS_).

A producer, a worker and the local stack all build the same `Settings`; whatever differs between
machines (the broker's address, where the media root is mounted) comes from the environment or,
in Kubernetes, from a ConfigMap and a Secret.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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

    model_config = SettingsConfigDict(env_prefix="GPUJOBS_", extra="ignore")

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
        description="ffmpeg binary. Unset: `ffmpeg` on PATH, else the one imageio-ffmpeg ships.",
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="Name of this node in job records and queue names (Kubernetes: spec.nodeName).",
    )

    # Transcode defaults: the command teams run today.
    default_height: int = 480
    default_codec: Codec = "h264"
    default_preset: Preset = "p1"
    default_cq: int = 28
    default_audio: AudioMode = "copy"
    default_threads: int = 2

    visibility_timeout_s: int = Field(
        default=12 * 3600,
        description="Seconds before Redis redelivers an unacknowledged job; longer than the "
        "longest job, so a slow job is not run twice. Default 12 h.",
    )
    progress_interval_s: float = Field(
        default=0.25, description="Least seconds between two progress updates of one job."
    )
    record_ttl_s: int = Field(
        default=7 * 24 * 3600,
        description="Seconds a finished job's record is kept (default 7 days); outputs never "
        "expire.",
    )
    connect_timeout_s: float = Field(
        default=3.0, description="Seconds to wait for the broker before saying it is unreachable."
    )

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
        """The ffmpeg to run: the configured one, `ffmpeg` on PATH, else imageio-ffmpeg's."""
        if self.ffmpeg:
            return self.ffmpeg
        on_path = shutil.which("ffmpeg")
        if on_path:
            return on_path
        import imageio_ffmpeg  # the worker extra; producers never reach this

        return str(imageio_ffmpeg.get_ffmpeg_exe())
