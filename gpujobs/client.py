"""The SDK: submit jobs, then watch, wait for, cancel and read them through a `Job` handle.

Paths given to the SDK are absolute, or relative to the media root. Everything is validated
before anything is queued; a problem raises InvalidSpec with one line that says what is wrong.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import redis
from celery import Celery

from gpujobs import batch, keys
from gpujobs.app import (
    TRANSCODE_QUEUE,
    gpu_queue,
    make_app,
    node_queue,
    shared_transcode_queue,
    worker_hostname,
)
from gpujobs.config import AudioMode, Codec, Preset, Settings
from gpujobs.connection import broker_url, connect
from gpujobs.errors import GpujobsError, InvalidSpec, JobFailed, JobNotFound
from gpujobs.media import NOT_VIDEO, STILL_IMAGE, input_verdict, read_verdicts
from gpujobs.paths import below, copy_file, inbox_target, media_relative, pure_posix
from gpujobs.prepared import PreparedJob, check_outputs, make_spec, stat_fingerprint
from gpujobs.publish import TaskMessages, transcode_submission
from gpujobs.routing import require_gpu_worker
from gpujobs.specs import (
    AudioTracks,
    GpuPolicy,
    JobRecord,
    JobState,
    SplitSetting,
    SubtitleMode,
    TranscodeSpec,
)
from gpujobs.store import JobStore, Submission

# What a submit_many item may set: submit_transcode's arguments, but force (one for all).
_ITEM_FIELDS = {
    "input", "output", "width", "height", "codec", "preset", "cq", "audio", "threads",
    "priority", "gpu", "node", "gpu_index", "copy_outside", "audio_tracks", "subtitles", "fps",
    "overwrite",
}  # fmt: skip
INBOX = "inbox"  # where files from outside the media root are copied, under the media root


class Client:
    """A connection to one gpujobs cluster (or the local stack). Cheap to make; reuse it.

    The broker is reached on first use, not here: checking a spec (`prepare_transcode`, a
    refused file) neither starts the local stack nor needs a broker. start_local: with no
    broker configured, start the embedded one on first use (False: BrokerUnreachable then).
    """

    def __init__(self, settings: Settings | None = None, start_local: bool = True) -> None:
        self.settings = settings or Settings()
        self._start_local = start_local
        self._app: Celery | None = None
        self._messages: TaskMessages | None = None
        self._media_root: Path | None = None
        self._dir_cache: dict[str, str] | None = None  # folders resolved, in a bulk submit
        self._checked_params: set[tuple[tuple[str, Any], ...]] = set()

    @functools.cached_property
    def broker_url(self) -> str:
        """The broker's URL (the local stack's, started if need be); BrokerUnreachable if none."""
        return broker_url(self.settings, start_local=self._start_local)

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """A client of the broker that has answered PING; BrokerUnreachable if it does not."""
        return connect(self.broker_url, self.settings)

    @functools.cached_property
    def store(self) -> JobStore:
        return JobStore(self.redis, record_ttl_s=self.settings.record_ttl_s)

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_app(self.settings, self.broker_url)
        return self._app

    def job(self, job_id: str) -> Job:
        return Job(job_id, self)

    def submit_transcode(
        self,
        input: str | Path,
        output: str | Path | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        codec: Codec | None = None,
        preset: Preset | None = None,
        cq: int | None = None,
        audio: AudioMode | None = None,
        threads: int | None = None,
        priority: int | None = None,
        gpu: GpuPolicy | None = None,
        audio_tracks: AudioTracks | None = None,
        subtitles: SubtitleMode | None = None,
        fps: float | None = None,
        overwrite: bool = False,
        split: SplitSetting | None = None,
        node: str | None = None,
        gpu_index: int | None = None,
        copy_outside: bool = True,
        force: bool = False,
    ) -> Job:
        """Queue a transcode of `input` and return its Job. None means the setting's default.

        input: a file (absolute, or relative to the media root; see copy_outside).
        output: default `<input stem>.<height>p.mp4` beside the input (`<width>w` for a width
        alone); must lie under the root.
        width, height: pixels (even); height default 480 (GPUJOBS_DEFAULT_HEIGHT) unless only a
        width is given (then the height follows the displayed aspect), width from
        the aspect ratio. codec: h264|hevc. preset: NVENC's p1 (fastest)..p7, mapped to x264's
        presets on the CPU. cq: constant quality 0..51 (crf on the CPU), default 28.
        audio: copy|aac|none (copy: each track the output can hold is copied, others become
        AAC). threads: decoder threads, default 2. priority: 0..9, 9 first, default 5.
        gpu: auto (GPU when the worker has one), require, forbid.
        audio_tracks: all (default) or first. subtitles: drop (default) or keep (text
        subtitles, as mov_text in MP4). fps: None keeps the source's frame timing, a number
        gives that constant rate. overwrite: replace an existing output (default: refused).
        split: None (one piece); N: cut at keyframes into N pieces encoded by N workers at
        once and joined; "auto": N from the idle workers and the length (pieces >= 30 s).
        node, gpu_index: run it on that node, or on GPU `gpu_index` (nvidia-smi index) of that
        node; an InvalidSpec when no worker there has a live heartbeat. Default: any worker.
        copy_outside: copy an input from outside the media root into `<media root>/inbox`
        first (default True, as the CLI does); False: such an input is an InvalidSpec.
        force: queue a new job even when one for the same input and spec is queued or running
        (by default that job is returned).
        Raises InvalidSpec (one line: what is wrong, e.g. "input x.m4a: no video stream (audio
        with cover art)", "input up.mp4: the file is incomplete (no moov atom)", an existing
        output without overwrite), BrokerUnreachable.
        """
        params = {
            "width": width, "height": height, "codec": codec, "preset": preset, "cq": cq,
            "audio": audio, "threads": threads, "priority": priority, "gpu": gpu,
            "audio_tracks": audio_tracks, "subtitles": subtitles, "fps": fps,
            "overwrite": overwrite or None,
            "split": split,
        }  # fmt: skip
        prepared = self.prepare_transcode(input, output, copy_outside, **params)
        require_gpu_worker(prepared.spec.gpu, self.heartbeats, node, gpu_index)
        queue = self.route(node, gpu_index, prepared.spec.gpu)
        return self.enqueue(prepared, force=force, queue=queue)

    def prepare_transcode(
        self,
        input: str | Path,
        output: str | Path | None = None,
        copy_outside: bool = False,
        **params: Any,
    ) -> PreparedJob:
        """Check everything about a transcode without changing anything (InvalidSpec if bad)."""
        defaults = {
            "height": self.settings.default_height,
            "codec": self.settings.default_codec,
            "preset": self.settings.default_preset,
            "cq": self.settings.default_cq,
            "audio": self.settings.default_audio,
            "threads": self.settings.default_threads,
        }
        values = {**defaults, **{k: v for k, v in params.items() if v is not None}}
        if params.get("width") is not None and params.get("height") is None:
            values["height"] = None  # a width alone: the height follows the input's aspect
        # The parameters first, on stand-in paths: a bad --cq is reported before any file check.
        # (Checked once per set of parameters: a bulk submit repeats them.)
        checked = tuple(sorted(values.items()))
        if checked not in self._checked_params:
            make_spec({**values, "input": "in.mp4", "output": "out.mp4"})
            if len(self._checked_params) < 1024:
                self._checked_params.add(checked)
        source, copy_from, source_stat = self.input_path(input, copy_outside)
        if output is None:
            size = f"{values['height']}p" if values["height"] else f"{values['width']}w"
            named = PurePosixPath(source)
            output_rel = named.with_name(f"{named.stem}.{size}.mp4").as_posix()
        else:
            output_rel = media_relative(
                output, self.settings.media, "output", self._media_resolved(), self._dir
            )
        spec = make_spec({**values, "input": source, "output": output_rel})
        target = os.path.join(self.settings.media, spec.output)
        if os.path.islink(target):  # the worker writes where the link points: check there
            self._check_linked_output(spec, target, copy_from)
        if not spec.overwrite and os.path.exists(target):
            raise InvalidSpec(f"output {spec.output} exists (use --overwrite to replace it)")
        # The input's stat (it follows symlinks): the same file copied in or not.
        found = stat_fingerprint(spec, source_stat)
        return PreparedJob(spec=spec, fingerprint=found, copy_from=copy_from)

    def _check_linked_output(self, spec: TranscodeSpec, link: str, copy_from: Path | None) -> None:
        """An output path that is a symlink: where it points must lie in the media root and
        must not be the input (the worker would write the transcode over its own source)."""
        points_to = os.path.realpath(link)
        if below(points_to, os.fspath(self._media_resolved())) is None:
            raise InvalidSpec(f"output {spec.output} is a link that points outside the media root")
        source = os.path.join(self.settings.media, spec.input)
        if copy_from is None and os.path.realpath(source) == points_to:
            raise InvalidSpec(f"output {spec.output} is the input {spec.input} (through a link)")

    def read_inputs(self, inputs: Iterable[str | Path]) -> None:
        """Read many inputs' headers at once, on every core, ahead of their checks
        (`prepare_transcode` then finds each verdict remembered): a bulk submit of new files
        is bound by these reads. Paths as `prepare_transcode` takes them; anything that
        cannot be read is left to that check to report."""
        named = dict.fromkeys(os.fspath(given) for given in inputs if given)  # each once
        read_verdicts(Path(self._located(given)) for given in named)

    def _located(self, given: str) -> str:
        """Where an input path points: `~` expanded; absolute, or under the media root."""
        return os.path.join(self.settings.media, os.path.expanduser(given))  # absolute: itself

    def _dir(self, folder: str) -> str:
        """`folder` resolved; during a bulk submit, each folder once."""
        if self._dir_cache is None:
            return os.path.realpath(folder)
        found = self._dir_cache.get(folder)
        if found is None:
            found = self._dir_cache[folder] = os.path.realpath(folder)
        return found

    def _media_resolved(self) -> Path:
        """The media root with its symlinks resolved (once per client)."""
        if self._media_root is None:
            self._media_root = self.settings.media.resolve()
        return self._media_root

    def input_path(
        self, given: str | Path, copy_outside: bool
    ) -> tuple[str, Path | None, os.stat_result]:
        """Check an input video as every submit does (exists, a regular non-empty file, a
        video container PyAV can read, complete); (its POSIX path relative to the media root,
        the file to copy to that path first when it lies outside the root, else None, its stat).

        given: absolute, or relative to the media root. copy_outside: False makes an input
        outside the media root an InvalidSpec. Raises InvalidSpec (one line) otherwise too.
        Written with os.path, not pathlib: a bulk submit runs it once a job."""
        shown = os.fspath(given)
        if not shown.strip():
            raise InvalidSpec("input path is empty")
        path = self._located(pure_posix(shown))
        folder, name = os.path.split(path)
        if name.startswith("-"):
            raise InvalidSpec(f"input file name {name!r} must not start with '-'")
        try:
            info = os.stat(path)  # one stat answers the four questions below
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidSpec(f"input {shown} does not exist") from None
        except OSError as exc:
            raise InvalidSpec(f"input {shown} cannot be read: {exc.strerror or exc}") from None
        if stat.S_ISDIR(info.st_mode):
            raise InvalidSpec(f"input {shown} is a directory, not a video file")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidSpec(f"input {shown} is not a regular file")
        if info.st_size == 0:
            raise InvalidSpec(f"input {shown} is empty")
        try:
            # The container sniffed, then its header read with PyAV (cover art only, an
            # incomplete file); once per unchanged file in this process.
            verdict = input_verdict(path, info)
        except OSError as exc:
            raise InvalidSpec(f"input {shown} cannot be read: {exc.strerror or exc}") from None
        if verdict in (NOT_VIDEO, STILL_IMAGE):
            raise InvalidSpec(f"input {shown} is {verdict}")
        if verdict is not None:
            raise InvalidSpec(f"input {shown}: {verdict}")
        media = self._media_resolved()
        # The folder resolved (once per folder in a bulk submit), then the file if it is a link.
        if os.path.islink(path):
            resolved = os.path.realpath(path)
        else:  # realpath, not normpath: `link/..` is not `.`
            resolved = os.path.join(self._dir(folder), name)
        inside = below(resolved, os.fspath(media))
        if inside is not None:
            return inside, None, info
        if not copy_outside:
            raise InvalidSpec(f"input {shown} is outside the media root {media}")
        outside = Path(resolved)
        target = inbox_target(outside, media / INBOX)
        return target.relative_to(media).as_posix(), outside, info

    def enqueue(
        self, prepared: PreparedJob, force: bool = False, queue: str = TRANSCODE_QUEUE
    ) -> Job:
        """Copy the input in if needed, record the job and queue it (one round trip).

        The same input with the same spec while a job for it is queued or running returns that
        job instead (an idempotency key), unless `force`.
        """
        return self.enqueue_many([prepared], force=force, queue=queue)[0]

    def enqueue_many(
        self,
        prepared: Sequence[PreparedJob],
        force: bool = False,
        queue: str | Sequence[str] = TRANSCODE_QUEUE,
        batch_size: int = 500,
    ) -> list[Job]:
        """Queue checked jobs, `batch_size` per round trip; their Jobs, in order.

        Each batch is one script call (`JobStore.submit`) that writes each job's record, index
        entry, duplicate check, Celery message and task-sent event together, so a job is either
        wholly queued or not at all. queue: one queue for all, or one per job. A job whose input
        and spec match a queued or running job returns that job (unless `force`).
        """
        queues = [queue] * len(prepared) if isinstance(queue, str) else list(queue)
        if len(queues) != len(prepared):
            raise ValueError("give one queue, or one per job")
        jobs: list[Job] = []
        for start in range(0, len(prepared), batch_size):
            chunk = list(
                zip(
                    prepared[start : start + batch_size],
                    queues[start : start + batch_size],
                    strict=True,
                )
            )
            for item, _ in chunk:
                self._copy_in(item)
            submissions = [self._submission(item, item_queue, force) for item, item_queue in chunk]
            found = self.store.submit(submissions)
            for submission, existing in zip(submissions, found, strict=True):
                jobs.append(Job(existing or submission.record.id, self))
                jobs[-1].already_queued = existing is not None
        return jobs

    def _copy_in(self, prepared: PreparedJob) -> None:
        if prepared.copy_from is None:
            return
        try:
            copy_file(prepared.copy_from, self.settings.media / prepared.spec.input)
        except OSError as exc:
            raise GpujobsError(
                f"cannot copy {prepared.copy_from} into the media root: {exc.strerror or exc}"
            ) from None

    def _submission(self, prepared: PreparedJob, queue: str, force: bool) -> Submission:
        # The same spec sent to another node or GPU is another job.
        found = None if force else f"{prepared.fingerprint}:{queue}"
        return transcode_submission(self.messages, prepared.spec, queue, found)

    @property
    def messages(self) -> TaskMessages:
        if self._messages is None:
            self._messages = TaskMessages(self.app, self.broker_url)
        return self._messages

    def submit_many(
        self,
        items: Iterable[str | Path | Mapping[str, Any]],
        *,
        force: bool = False,
        batch_size: int = 500,
    ) -> list[Job]:
        """Queue many transcodes, `batch_size` per round trip; their Jobs, in order.

        items: an input path each (every other setting its default), or a mapping of
        `submit_transcode`'s arguments (`input`, and any of `output`, `width`, `height`,
        `codec`, `preset`, `cq`, `audio`, `threads`, `priority`, `gpu`, `node`, `gpu_index`,
        `copy_outside`). Every item is checked before anything is queued: InvalidSpec names
        the first bad one (`item 3: ...`) and nothing is queued. force: as in submit_transcode.
        """
        if isinstance(items, str | Path | Mapping):
            raise TypeError(
                f"items must be a list of input paths or mappings, not one {type(items).__name__}"
            )
        prepared: list[PreparedJob] = []
        queues: list[str] = []
        self._dir_cache = {}
        try:
            self._prepare_items(items, prepared, queues)
        finally:
            self._dir_cache = None
        check_outputs(prepared)
        return self.enqueue_many(prepared, force=force, queue=queues, batch_size=batch_size)

    def _prepare_items(
        self,
        items: Iterable[str | Path | Mapping[str, Any]],
        prepared: list[PreparedJob],
        queues: list[str],
    ) -> None:
        items = list(items)
        for number, item in enumerate(items, start=1):
            if not isinstance(item, str | Path | Mapping):
                raise TypeError(
                    f"item {number}: must be an input path or a mapping, not {type(item).__name__}"
                )
        inputs = [item if isinstance(item, str | Path) else item.get("input") for item in items]
        self.read_inputs(given for given in inputs if isinstance(given, str | Path))
        for number, item in enumerate(items, start=1):
            given: dict[str, Any] = {"input": item} if isinstance(item, str | Path) else dict(item)
            unknown = sorted(set(given) - _ITEM_FIELDS)
            try:
                if "input" not in given:
                    raise InvalidSpec("no input")
                if unknown:
                    raise InvalidSpec(f"unknown setting {unknown[0]!r}")
                node, gpu_index = given.pop("node", None), given.pop("gpu_index", None)
                input_path, output = given.pop("input"), given.pop("output", None)
                copy_outside = bool(given.pop("copy_outside", False))
                job = self.prepare_transcode(input_path, output, copy_outside, **given)
                require_gpu_worker(job.spec.gpu, self.heartbeats, node, gpu_index)
                prepared.append(job)
                queues.append(self.route(node, gpu_index, job.spec.gpu))
            except InvalidSpec as exc:
                raise InvalidSpec(f"item {number}: {exc}") from None

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        """The live heartbeat of every node by name (see workers/heartbeat.py for the shape);
        nodes whose heartbeat expired are dropped from keys.NODES on the way."""
        names = sorted(str(name) for name in self.redis.smembers(keys.NODES))
        beats: dict[str, dict[str, Any]] = {}
        raws = self.redis.mget([keys.heartbeat(name) for name in names]) if names else []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                self.redis.srem(keys.NODES, name)
                continue
            try:
                beat = json.loads(raw)
            except ValueError:
                continue  # a garbled heartbeat names no live worker
            if isinstance(beat, dict):
                beats[name] = beat
        return beats

    def route(self, node: str | None, gpu: int | None, gpu_policy: str = "auto") -> str:
        """The queue for a job sent to `node` (and GPU `gpu` of it); InvalidSpec when no live
        worker there would take it. No node and no GPU: the shared transcode queue, or, for a
        job whose gpu_policy is "require", the queue only workers with a GPU consume."""
        if node is None and gpu is None:
            return shared_transcode_queue(gpu_policy)
        if node is None:
            raise InvalidSpec("a GPU index needs a node (--node) to say whose GPU it is")
        if gpu is not None and gpu < 0:
            raise InvalidSpec(f"GPU index must be 0 or more, got {gpu}")
        beats = self.heartbeats()
        beat = beats.get(node)
        if beat is None:
            known = ", ".join(beats) or "none"
            raise InvalidSpec(f"no worker on node {node!r} (no heartbeat; nodes up: {known})")
        if gpu is None:
            return node_queue(node)
        workers = beat.get("workers", [])
        if worker_hostname(node, gpu) not in workers:
            served = sorted(w.rsplit(".gpu", 1)[1] for w in workers if ".gpu" in w)
            raise InvalidSpec(
                f"no worker on GPU {gpu} of node {node!r} (GPUs with workers: "
                f"{', '.join(served) or 'none'})"
            )
        return gpu_queue(node, gpu)

    def submit_inference(
        self,
        input: str | Path | Iterable[Mapping[str, Any]],
        output: str | Path | None = None,
        *,
        endpoint: str | None = None,
        model: str | None = None,
        max_concurrency: int | None = None,
        chunk_size: int | None = None,
        request_timeout_s: float | None = None,
        max_retries: int | None = None,
        deadline_s: float | None = None,
        server_wait_s: float | None = None,
        priority: int | None = None,
        adaptive: bool | None = None,
        overwrite: bool = False,
    ) -> Job:
        """Queue a batch of OpenAI-style requests; its Job. None means the setting's default.

        input: an OpenAI batch JSONL file (absolute, or relative to the media root) or an
        iterable of request dicts (`custom_id`, `method`, `url`, `body`).
        output: default `<stem>.results.jsonl` beside an input under the media root, else
        `batches/<job id>/<stem>.results.jsonl`.
        endpoint: the server's base URL, default GPUJOBS_VLLM_ENDPOINT
        (http://localhost:9999/v1). model: put into bodies that name none.
        max_concurrency: requests in flight per chunk, default 10 (vLLM's `--max-num-seqs`).
        chunk_size: requests per chunk task, default 250. request_timeout_s: seconds per
        request, default 600. max_retries: per request on 429/5xx/connection errors, default 5.
        deadline_s: seconds for the whole batch, default none. server_wait_s: how long a chunk
        waits for the server to come up, default 120. priority: 0..9, 9 first, default 5.
        adaptive: follow the server's load (default true); False: max_concurrency per chunk.
        overwrite: replace an existing results or errors file; by default the submit is
        refused (InvalidSpec) rather than replace an earlier run's results.
        The checks and the chunking live in gpujobs/batch.py. Raises InvalidSpec (one line
        naming the line and field at fault), BrokerUnreachable.
        """
        params = {
            "endpoint": endpoint, "model": model, "max_concurrency": max_concurrency,
            "chunk_size": chunk_size, "request_timeout_s": request_timeout_s,
            "max_retries": max_retries, "deadline_s": deadline_s, "server_wait_s": server_wait_s,
            "priority": priority, "adaptive": adaptive, "overwrite": overwrite,
        }  # fmt: skip
        return self.enqueue_batch(batch.prepare_batch(self.settings, input, output, **params))

    def enqueue_batch(self, prepared: batch.PreparedBatch) -> Job:
        """Queue a batch checked by `gpujobs.batch.prepare_batch`; its Job."""
        job_id = batch.enqueue_batch(
            prepared, settings=self.settings, store=self.store, app=self.app
        )
        return Job(job_id, self)

    def list(self, limit: int = 50, states: tuple[JobState, ...] = ()) -> list[JobRecord]:
        return self.store.list(limit=limit, states=states)


class Job:
    """A handle on one job. Reads go to the store; nothing is cached."""

    already_queued: bool = False  # a submit returned this queued or running job, same spec

    def __init__(self, job_id: str, client: Client | None = None) -> None:
        self.id = job_id
        self.client = client or Client()

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobRecord:
        record = self.client.store.get(self.id)
        if record is None:
            raise JobNotFound(f"no job {self.id!r} (never submitted, or its record expired)")
        return record

    def watch(self, timeout: float | None = None) -> Iterator[JobRecord]:
        """Yield the record now and on every update until the job ends (live, no polling).

        timeout: seconds in all (None: no limit); TimeoutError when it passes.
        """
        try:
            yield from self.client.store.watch([self.id], timeout_s=timeout)
        except KeyError:
            raise JobNotFound(f"no job {self.id!r}") from None

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Block until the job ends and return its final record. timeout: seconds."""
        last = None
        for record in self.watch(timeout=timeout):
            last = record
        assert last is not None
        return last

    def cancel(self) -> bool:
        """Cancel a queued or running job (a split job: with all its pieces); False when it
        had already ended."""
        record = self.status()  # JobNotFound for an unknown id
        active = (JobState.QUEUED, JobState.RUNNING)
        cancelled = self.client.store.update(
            self.id, only_from=active, state=JobState.CANCELLED, eta_s=None
        )
        for piece in record.pieces or []:
            self.client.store.update(piece, only_from=active, state=JobState.CANCELLED, eta_s=None)
        return cancelled

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its result; JobFailed when it failed or was cancelled."""
        record = self.wait(timeout=timeout)
        if record.state is not JobState.SUCCEEDED:
            reason = f": {record.error}" if record.error else ""
            raise JobFailed(f"job {self.id} {record.state.value}{reason}")
        return record.result or {}
