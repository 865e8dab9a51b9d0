"""What a job is: the specs producers submit, the record the store keeps, its progress.

Paths in a spec are relative to the media root (POSIX, no `..`): producers and workers may mount
the media root at different places, so only the part below it travels with the job.
"""

from __future__ import annotations

import json
import re
import secrets
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpujobs.config import AudioMode, Codec, Preset
from gpujobs.paths import pure_posix

# The largest output side, in pixels (8K; NVENC encodes HEVC up to 8192, H.264 up to 4096).
MAX_SIDE = 8192
GpuPolicy = Literal["auto", "require", "forbid"]
AudioTracks = Literal["all", "first"]
SubtitleMode = Literal["keep", "drop"]


def compact_json(value: Any) -> str:
    """`value` as JSON without spaces, as records, messages and events are kept in Redis
    (non-ASCII as UTF-8, dict keys as text). orjson, not `json.dumps`: a bulk submit spent
    about 35 us a job, a fifth of its time, encoding the message, its task-sent event and the
    record with `json.dumps`; orjson does it in a tenth of that (docs/benchmarks.md)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# How many pieces a transcode is cut into (see TranscodeSpec.split): a number, or "auto".
SplitSetting = int | Literal["auto"]
MAX_SPLIT = 64


class JobState(StrEnum):
    """The life of a job. The last three are terminal: nothing moves a job out of them."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    TRANSCODE = "transcode"
    INFERENCE = "inference"


def check_media_path(value: str, what: str) -> str:
    """A path relative to the media root: POSIX, not absolute, no `..`, no name starting with `-`.

    Returns it normalised as PurePosixPath normalises (`a//b/./c` -> `a/b/c`; `paths.pure_posix`,
    str operations: every job's input and output pass here, and PurePosixPath's parsing was a
    tenth of a bulk submit's time on Python 3.11). Raises ValueError with one line that says
    what is wrong.
    """
    if not value or not value.strip():
        raise ValueError(f"{what} path is empty")
    if value.startswith("/"):
        raise ValueError(f"{what} path {value!r} must be relative to the media root")
    path = pure_posix(value)
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"{what} path {value!r} must not contain '..'")
    if parts[-1].startswith("-"):
        # ffmpeg would read such a name as an option if it were ever passed bare.
        raise ValueError(f"{what} file name {parts[-1]!r} must not start with '-'")
    bad = _UNPRINTABLE.search(value)
    if bad is not None:
        if bad.group() >= "\ud800":  # a name's undecodable byte, as os.fsdecode keeps it
            raise ValueError(f"{what} path is not valid UTF-8")
        raise ValueError(f"{what} path contains a control character ({bad.group()!r})")
    return path


# C0 and C1 controls and DEL (a terminal acts on them when a path is shown: ESC starts a
# sequence), and lone surrogates (bytes of a file name that are not UTF-8, as os.fsdecode
# keeps them; they cannot be stored or sent as text).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def suffix(path: str) -> str:
    """The extension of a normalised POSIX path's last part (as `check_media_path` returns it),
    as PurePosixPath.suffix gives it: from the last dot; "" for none, for a name that ends in
    a dot, and for a dot-file's leading dot."""
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


class MediaJobSpec(BaseModel):
    """What every job spec shares: an input and an output, both paths under the media root
    (see `check_media_path`), and not the same file. `output_suffixes`: the output's allowed
    extensions."""

    # Numbers are finite: JSON has no inf or NaN (an inf timeout was stored as null, and the
    # worker then refused the spec it was given).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    output_suffixes: ClassVar[tuple[str, ...]] = ()

    input: str
    output: str

    @field_validator("input")
    @classmethod
    def _input_path(cls, value: str) -> str:
        return check_media_path(value, "input")

    @field_validator("output")
    @classmethod
    def _output_path(cls, value: str) -> str:
        path = check_media_path(value, "output")
        if cls.output_suffixes and suffix(path).lower() not in cls.output_suffixes:
            *first, last = cls.output_suffixes
            allowed = f"{', '.join(first)} or {last}" if first else last
            raise ValueError(f"output must end in {allowed}, got {path.rpartition('/')[2]!r}")
        return path

    @model_validator(mode="after")
    def _output_differs(self) -> Self:
        if self.output == self.input:  # both normalised by their validators
            raise ValueError("output must differ from the input")
        return self


class TranscodeSpec(MediaJobSpec):
    """One transcode. Units: pixels for width/height; cq is the constant-quality level (0..51,
    lower is better; libx264's crf on the CPU paths); threads are ffmpeg decoder threads.

    width: None keeps the input's aspect ratio, rounded to an even number (1920x1080 -> 854x480).
    height: None (with a width) likewise takes it from the width (1920x1080 at width 1280 ->
    1280x720), as ffmpeg's `scale=1280:-2`.
    priority: 0 (lowest) .. 9 (most urgent), default 5.
    gpu: "auto" uses the fastest path the worker's card supports; "require" fails where no GPU
    path exists; "forbid" always encodes on the CPU.
    audio_tracks: "all" (default) keeps every audio track, "first" the first only.
    subtitles: "drop" (default) or "keep" (text subtitles, as mov_text in MP4/MOV).
    fps: None keeps the source's frame timing (variable rates too); a number makes the output
    that constant rate (frames per second, 1..240).
    overwrite: replace an existing output (default False: the job is refused).
    split: None (default) encodes in one piece; N (1..64) cuts the video at keyframes into N
    pieces that N workers encode at once, then joins them (workers/transcode/split.py); "auto"
    picks N from the idle workers and the length (pieces of at least split_min_piece_s).
    """

    output_suffixes = (".mp4", ".mkv", ".mov", ".m4v", ".ts")
    width: int | None = None
    height: int | None = 480
    codec: Codec = "h264"
    preset: Preset = "p1"
    cq: int = Field(default=28, ge=0, le=51)
    audio: AudioMode = "copy"
    threads: int = Field(default=2, ge=1, le=64)
    priority: int = Field(default=5, ge=0, le=9)
    gpu: GpuPolicy = "auto"
    audio_tracks: AudioTracks = "all"
    subtitles: SubtitleMode = "drop"
    fps: float | None = Field(default=None, gt=0, le=240)
    overwrite: bool = False
    split: SplitSetting | None = None

    @property
    def output_suffix(self) -> str:
        """The output's extension, lower case (".mp4")."""
        return suffix(self.output).lower()

    @field_validator("split")
    @classmethod
    def _split_pieces(cls, value: SplitSetting | None) -> SplitSetting | None:
        if isinstance(value, int) and not 1 <= value <= MAX_SPLIT:
            raise ValueError(f"must be auto or 1..{MAX_SPLIT} pieces, got {value}")
        return value

    @model_validator(mode="after")
    def _a_size(self) -> Self:
        if self.width is None and self.height is None:
            raise ValueError("give a height, a width, or both")
        return self

    @field_validator("width", "height")
    @classmethod
    def _even_positive(cls, value: int | None) -> int | None:
        if value is None:
            return value
        if value <= 0:
            raise ValueError(f"must be a positive number of pixels, got {value}")
        if value % 2:
            raise ValueError(f"must be even (4:2:0 video needs even sizes), got {value}")
        if value > MAX_SIDE:
            raise ValueError(f"must be at most {MAX_SIDE}, got {value}")
        return value


# The OpenAI routes a batch line may name (`url`), as the OpenAI Batch API and vllm run-batch.
InferenceUrl = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
INFERENCE_URLS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


# Routes an OpenAI-compatible server (vLLM) serves under its base URL: an endpoint that ends
# in one names a route, not the server.
SERVER_ROUTES: tuple[str, ...] = (
    "chat/completions", "completions", "embeddings", "models", "health", "metrics", "batches",
    "files", "responses", "score", "rerank", "pooling", "classify", "tokenize", "detokenize",
    "audio/transcriptions", "audio/translations", "version", "ping",
)  # fmt: skip


def endpoint_route(url: str) -> str | None:
    """The route part of an endpoint that names one (`/chat/completions` of
    `http://h:9999/v1/chat/completions`, anything after `/v1/`); None for a base URL."""
    path = "/" + url.partition("://")[2].partition("/")[2].rstrip("/")
    _, sep, tail = path.partition("/v1/")
    if sep:
        return "/" + tail
    for route in SERVER_ROUTES:
        if path.endswith("/" + route):
            return "/" + route
    return None


class InferenceSpec(MediaJobSpec):
    """One batch of OpenAI-style requests sent to an OpenAI-compatible server (vLLM).

    input: the checked requests file workers read (JSONL, relative to the media root; the SDK
    writes it); source: what the producer submitted, for display; requests: how many lines.
    output: the results file (JSONL, one line per request, input order); failed lines also go to
    `errors_output` beside it.
    endpoint: the server's base URL, with or without the trailing /v1 (default: the node's
    vLLM, http://localhost:9999/v1, as seen from the worker).
    model: overrides every request's model; None keeps each body's, and a body without one gets
    the server's only model (from /v1/models).
    max_concurrency: requests in flight per chunk (the server's --max-num-seqs), default 10.
    adaptive: follow the server's load instead (workers/inference/adaptive.py): the workers
    that send to one server share a window of requests in flight that starts at
    max_concurrency and moves with the server's queue (default true).
    chunk_size: requests per chunk task (default 250); chunks are shared between workers.
    request_timeout_s: seconds one request may take (default 600).
    max_retries: retries after 429, 5xx or a connection error (default 5).
    deadline_s: seconds after submission after which requests not yet done are failed as
    `deadline_exceeded` (None: no deadline).
    server_wait_s: seconds a chunk waits for the server to come up before the job fails (120).
    priority: 0 (lowest) .. 9 (most urgent), default 5.
    overwrite: replace an existing results or errors file (default: the submit is refused).
    """

    output_suffixes = (".jsonl",)
    source: str | None = None
    requests: int = Field(ge=1)
    endpoint: str = "http://localhost:9999/v1"
    model: str | None = None
    max_concurrency: int = Field(default=10, ge=1, le=1024)
    adaptive: bool = True
    chunk_size: int = Field(default=250, ge=1, le=1_000_000)
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=100)
    deadline_s: float | None = Field(default=None, gt=0)
    server_wait_s: float = Field(default=120.0, ge=0)
    priority: int = Field(default=5, ge=0, le=9)
    overwrite: bool = False

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        scheme, sep, rest = value.partition("://")
        if "@" in rest.split("/")[0]:  # not echoed: the line would show the password
            raise ValueError(
                "must not hold a user or password (the URL is kept in the job record and shown "
                "by status): set GPUJOBS_VLLM_API_KEY, from the environment or a Secret"
            )
        if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
            raise ValueError(f"must be an http(s) URL (http://host:9999/v1), got {value!r}")
        route = endpoint_route(value)
        if route:
            base = value[: len(value) - len(route)]
            raise ValueError(
                f"{value!r} names a route ({route}), not the server's base URL: give {base!r}"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def errors_output(self) -> str:
        """The errors file: the output's name with `.errors` before `.jsonl`."""
        path = PurePosixPath(self.output)
        return path.with_name(f"{path.stem}.errors{path.suffix}").as_posix()


class Progress(BaseModel):
    """A live snapshot of a running job, as published on its channel.

    percent: 0..100; fps: frames per second; speed: multiple of real time; eta_s: seconds left.
    """

    job_id: str
    state: JobState
    percent: float = 0.0
    fps: float | None = None
    speed: float | None = None
    eta_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


# Record fields stored as JSON text inside the job's Redis hash.
_JSON_FIELDS = ("spec", "result", "pieces")


def new_job_id() -> str:
    """A new job's id: 12 lowercase hex digits, 48 random bits (from `secrets`)."""
    return secrets.token_hex(6)


class JobRecord(BaseModel):
    """Everything the store knows of one job. Timestamps are Unix seconds."""

    id: str
    kind: JobKind
    state: JobState
    spec: dict[str, Any]
    percent: float = 0.0
    fps: float | None = None
    speed: float | None = None
    eta_s: float | None = None
    worker: str | None = None
    node: str | None = None
    gpu: str | None = None
    encode_path: str | None = None
    # The Celery queue the job was sent to (shared, per node or per GPU): a requeue goes back there.
    queue: str | None = None
    attempt: int = 0
    error: str | None = None
    output: str | None = None
    result: dict[str, Any] | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    # A split transcode (TranscodeSpec.split): the parent lists its pieces' job ids in order;
    # each piece names its parent.
    pieces: list[str] | None = None
    parent: str | None = None

    def to_hash(self) -> dict[str, str]:
        """Flatten for a Redis hash: JSON for nested fields, no entry for None."""
        # The fields as they are (str, float, int, StrEnum, or JSON-ready dicts and lists, as
        # validated): str() writes each as pydantic's JSON mode would, at a third of the cost.
        return {
            name: compact_json(value) if name in _JSON_FIELDS else str(value)
            for name, value in self.__dict__.items()
            if value is not None
        }

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        values: dict[str, Any] = dict(data)
        for name in _JSON_FIELDS:
            if name in values:
                values[name] = json.loads(values[name])
        return cls.model_validate(values)

    def progress(self) -> Progress:
        return Progress(
            job_id=self.id,
            state=self.state,
            percent=self.percent,
            fps=self.fps,
            speed=self.speed,
            eta_s=self.eta_s,
            error=self.error,
        )
