"""`gpujobs submit`: queue transcodes (a `.jsonl` input is handed to the batch commands)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpujobs.cli import inference as cli_inference
from gpujobs.cli import ladder as cli_ladder
from gpujobs.cli.options import positive_seconds
from gpujobs.cli.render import (
    console,
    exit_for,
    follow,
    leave_running,
    record_json,
    start_stack,
)
from gpujobs.errors import InvalidSpec

if TYPE_CHECKING:
    from gpujobs.prepared import PreparedJob


def submit(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Video files to transcode.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output path (one input only).  [default: STEM.HEIGHTp.mp4 beside the input]",
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(metavar="PIXELS", help="Width.  [default: keeps the aspect ratio]"),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(
            metavar="PIXELS", help="Height (with --width alone: from the aspect).  [default: 480]"
        ),
    ] = None,
    codec: Annotated[
        str | None, typer.Option(metavar="h264|hevc", help="Video codec.  [default: h264]")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            metavar="p1..p7",
            help="NVENC preset, p1 fastest (x264 superfast..slower on the CPU).  [default: p1]",
        ),
    ] = None,
    cq: Annotated[
        int | None,
        typer.Option(
            metavar="0..51",
            help="Constant quality, lower is better (crf on the CPU).  [default: 28]",
        ),
    ] = None,
    audio: Annotated[
        str | None, typer.Option(metavar="copy|aac|none", help="Audio.  [default: copy]")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(metavar="N", help="ffmpeg decoder threads.  [default: 2]")
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(metavar="0..9", help="9 is served first.  [default: 5]"),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            metavar="auto|require|forbid",
            help="Use the GPU when the worker has one, insist, or never.  [default: auto]",
        ),
    ] = None,
    audio_tracks: Annotated[
        str | None,
        typer.Option(metavar="all|first", help="Audio tracks to keep.  [default: all]"),
    ] = None,
    subtitles: Annotated[
        str | None,
        typer.Option(
            metavar="drop|keep",
            help="Keep text subtitles (as mov_text) or drop them.  [default: drop]",
        ),
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(
            metavar="FPS", help="Constant output frame rate.  [default: the source's timing]"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file.")
    ] = False,
    split: Annotated[
        str | None,
        typer.Option(
            metavar="N|auto", help="Cut into N pieces encoded by N workers at once, or auto."
        ),
    ] = None,
    ladder: Annotated[
        str | None,
        typer.Option(
            metavar="HEIGHTS",
            help="An ABR ladder of these heights, e.g. 1080,720,480 (HLS by default).",
        ),
    ] = None,
    hls: Annotated[bool, typer.Option("--hls", help="Package the ladder as HLS (fMP4).")] = False,
    dash: Annotated[bool, typer.Option("--dash", help="Package the ladder as DASH.")] = False,
    node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Run on this node only (it must have a live worker).  [default: any node]",
        ),
    ] = None,
    gpu_index: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="With --node: run on this GPU (nvidia-smi index) only.  [default: any GPU]",
        ),
    ] = None,
    copy: Annotated[
        bool, typer.Option(help="Copy inputs from outside the media root into its inbox first.")
    ] = True,
    wait: Annotated[bool, typer.Option("--wait", help="Draw progress until the jobs end.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Queue even if the same job is queued or running.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="With --wait: give up after this long.  [default: no limit]",
            callback=positive_seconds,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print job records as JSON.")] = False,
) -> None:
    """Queue a transcode for each FILE (all are checked before any is queued)."""
    from gpujobs.client import Client
    from gpujobs.config import Settings
    from gpujobs.prepared import check_outputs
    from gpujobs.routing import require_gpu_worker
    from gpujobs.specs import JobState

    if output is not None and len(files) > 1:
        raise InvalidSpec("--output takes one input file; drop it to name outputs per input")
    params: dict[str, object] = {
        "width": width, "height": height, "codec": codec, "preset": preset, "cq": cq,
        "audio": audio, "threads": threads, "priority": priority, "gpu": gpu,
        "audio_tracks": audio_tracks, "subtitles": subtitles, "fps": fps,
        "overwrite": overwrite or None,
        "split": split_setting(split),
    }  # fmt: skip
    asked = cli_ladder.ladder_options(ladder, hls, dash)
    if asked is not None:  # an ABR ladder per input instead of one output each
        shared = {"preset": preset, "cq": cq, "audio": audio, "threads": threads,
                  "priority": priority, "gpu": gpu, "split": params["split"]}  # fmt: skip
        only = {"width": width, "height": height, "codec": codec, "node": node,
                "gpu_index": gpu_index}  # fmt: skip
        cli_ladder.submit_ladders(files, output, asked, shared, only, copy, wait, timeout, as_json)
        return
    if any(cli_inference.is_batch_file(f) for f in files):  # a .jsonl input is a batch
        batch_only = {"priority": priority, "overwrite": overwrite}
        others = {**{k: v for k, v in params.items() if k not in batch_only}, "node": node,
                  "gpu_index": gpu_index, "force": force or None}  # fmt: skip
        cli_inference.submit_batches(files, output, batch_only, wait, timeout, as_json, others)
        return
    settings = Settings()
    client = Client(settings)  # reaches the broker on first use, after every file is checked
    prepared: list[PreparedJob] = []
    givens = [file if file.is_absolute() else Path.cwd() / file for file in files]
    client.read_inputs(givens)  # every new file's header read at once, on every core
    for file, given in zip(files, givens, strict=True):
        if file.name.startswith("-"):
            raise InvalidSpec(f"input file name {file.name!r} must not start with '-'")
        out = None if output is None else (output if output.is_absolute() else Path.cwd() / output)
        prepared.append(client.prepare_transcode(given, out, copy_outside=copy, **params))
    check_outputs(prepared)
    start_stack(settings)
    # Before anything is queued: a dead target, or --gpu require with no GPU worker, fails.
    if any(p.spec.gpu == "require" for p in prepared):
        require_gpu_worker("require", client.heartbeats, node, gpu_index)
    # A job that requires a GPU goes where only a GPU worker takes it.
    policies = {p.spec.gpu for p in prepared}
    routes = {policy: client.route(node, gpu_index, policy) for policy in policies}
    queues = [routes[p.spec.gpu] for p in prepared]
    jobs = client.enqueue_many(prepared, force=force, queue=queues)  # one script call per batch
    with leave_running([job.id for job in jobs]):  # from here on, Ctrl-C leaves them queued
        for job in jobs:
            if as_json and not wait:
                console.print_json(record_json(job.status()))
            elif not as_json:
                said = "already queued as" if job.already_queued else "queued"
                console.print(f"{said} {job.id}  {job.status().spec['input']}", markup=False)
        if not wait:
            return
        records = follow(client, [job.id for job in jobs], timeout)
    if as_json:
        for record in records:
            console.print_json(record_json(record))
    else:
        for record in records:
            if record.state is JobState.SUCCEEDED:
                out_path = client.settings.media / str(record.output)
                console.print(f"{record.id} succeeded: {out_path}", markup=False, soft_wrap=True)
    exit_for(records)


def split_setting(value: str | None) -> int | str | None:
    """`--split 4` -> 4, `--split auto` -> "auto"; anything else is one line."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise InvalidSpec(f"--split takes a number of pieces or auto, got {value!r}") from None


def register(app: typer.Typer) -> None:
    """Add `submit` to the gpujobs command."""
    app.command("submit")(submit)
