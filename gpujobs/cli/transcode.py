"""`gpujobs submit`: queue transcodes (a `.jsonl` input is handed to the batch commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpujobs.cli import inference as cli_inference
from gpujobs.cli.render import console, exit_for, follow_or_leave, open_client, record_json
from gpujobs.client import PreparedJob
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobState


def submit(
    files: Annotated[
        list[Path], typer.Argument(metavar="FILE...", help="Video files to transcode.")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            show_default="<input stem>.<height>p.mp4",
            help="Output path (one input only).",
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(metavar="PIXELS", show_default="keeps the aspect ratio", help="Width."),
    ] = None,
    height: Annotated[
        int | None, typer.Option(metavar="PIXELS", show_default="480", help="Height.")
    ] = None,
    codec: Annotated[
        str | None, typer.Option(metavar="h264|hevc", show_default="h264", help="Video codec.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            metavar="p1..p7",
            show_default="p1",
            help="NVENC preset, p1 fastest (x264 ultrafast..slow on the CPU).",
        ),
    ] = None,
    cq: Annotated[
        int | None,
        typer.Option(
            metavar="0..51",
            show_default="28",
            help="Constant quality, lower is better (crf on the CPU).",
        ),
    ] = None,
    audio: Annotated[
        str | None, typer.Option(metavar="copy|aac|none", show_default="copy", help="Audio.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(metavar="N", show_default="2", help="ffmpeg decoder threads.")
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(metavar="0..9", show_default="5", help="9 is served first."),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            metavar="auto|require|forbid",
            show_default="auto",
            help="Use the GPU when the worker has one, insist, or never.",
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
    ] = None,  # fmt: skip
    fps: Annotated[
        float | None,
        typer.Option(
            metavar="FPS", help="Constant output frame rate.  [default: the source's timing]"
        ),
    ] = None,  # fmt: skip
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file.")
    ] = False,
    node: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            show_default="any node",
            help="Run on this node only (it must have a live worker).",
        ),
    ] = None,
    gpu_index: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            show_default="any GPU",
            help="With --node: run on this GPU (nvidia-smi index) only.",
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
            metavar="SECONDS", show_default="no limit", help="With --wait: give up after this long."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print job records as JSON.")] = False,
) -> None:
    """Queue a transcode for each FILE (all are checked before any is queued)."""
    if output is not None and len(files) > 1:
        raise InvalidSpec("--output takes one input file; drop it to name outputs per input")
    params: dict[str, object] = {
        "width": width, "height": height, "codec": codec, "preset": preset, "cq": cq,
        "audio": audio, "threads": threads, "priority": priority, "gpu": gpu,
        "audio_tracks": audio_tracks, "subtitles": subtitles, "fps": fps,
        "overwrite": overwrite or None,
    }  # fmt: skip
    if any(cli_inference.is_batch_file(f) for f in files):  # a .jsonl input is a batch
        batch_only = {"priority": priority}
        others = {**{k: v for k, v in params.items() if k != "priority"}, "node": node,
                  "gpu_index": gpu_index, "force": force or None}  # fmt: skip
        cli_inference.submit_batches(files, output, batch_only, wait, timeout, as_json, others)
        return
    client = open_client(Settings())
    prepared: list[PreparedJob] = []
    for file in files:
        given = file if file.is_absolute() else Path.cwd() / file
        if file.name.startswith("-"):
            raise InvalidSpec(f"input file name {file.name!r} must not start with '-'")
        out = None if output is None else (output if output.is_absolute() else Path.cwd() / output)
        prepared.append(client.prepare_transcode(given, out, copy_outside=copy, **params))
    # Before anything is queued: a dead target, or --gpu require with no GPU worker, fails.
    require_gpu = any(p.spec.gpu == "require" for p in prepared)
    queue = client.route(node, gpu_index, require_gpu=require_gpu)
    jobs = [client.enqueue(p, force=force, queue=queue) for p in prepared]
    for job in jobs:
        if as_json and not wait:
            console.print_json(record_json(job.status()))
        elif not as_json:
            said = "already queued as" if job.already_queued else "queued"
            console.print(f"{said} {job.id}  {job.status().spec['input']}", markup=False)
    if not wait:
        return
    records = follow_or_leave(client, [job.id for job in jobs], timeout)
    if as_json:
        for record in records:
            console.print_json(record_json(record))
    else:
        for record in records:
            if record.state is JobState.SUCCEEDED:
                out_path = client.settings.media / str(record.output)
                console.print(f"{record.id} succeeded: {out_path}", markup=False, soft_wrap=True)
    exit_for(records)


def register(app: typer.Typer) -> None:
    """Add `submit` to the gpujobs command."""
    app.command("submit")(submit)
