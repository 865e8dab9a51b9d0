"""`gpujobs submit`: queue transcodes (a `.jsonl` input is handed to the batch commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpujobs.cli import inference as cli_inference
from gpujobs.cli import ladder as cli_ladder
from gpujobs.cli.render import console, exit_for, follow, record_json
from gpujobs.client import Client, PreparedJob
from gpujobs.config import Settings
from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobState


def submit(
    files: Annotated[list[Path], typer.Argument(help="Video files to transcode.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output path (one input only).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Width in pixels; default keeps aspect.")
    ] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels [default: 480].")] = None,
    codec: Annotated[str | None, typer.Option(help="h264 or hevc.")] = None,
    preset: Annotated[str | None, typer.Option(help="NVENC preset p1 (fastest)..p7.")] = None,
    cq: Annotated[
        int | None, typer.Option(help="Constant quality 0..51 (lower is better).")
    ] = None,
    audio: Annotated[str | None, typer.Option(help="copy, aac or none.")] = None,
    threads: Annotated[int | None, typer.Option(help="ffmpeg decoder threads.")] = None,
    priority: Annotated[int | None, typer.Option(help="0 (lowest) .. 9 (most urgent).")] = None,
    gpu: Annotated[str | None, typer.Option(help="auto, require or forbid.")] = None,
    audio_tracks: Annotated[
        str | None, typer.Option(help="all (every audio track, default) or first.")
    ] = None,
    subtitles: Annotated[
        str | None, typer.Option(help="drop (default) or keep (text subtitles, as mov_text).")
    ] = None,
    fps: Annotated[
        float | None, typer.Option(help="Constant output frame rate; default: source timing.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output file.")
    ] = False,
    split: Annotated[
        str | None,
        typer.Option(help="Cut into N pieces encoded by N workers at once, or auto."),
    ] = None,
    ladder: Annotated[
        str | None,
        typer.Option(help="An ABR ladder of these heights, e.g. 1080,720,480 (HLS by default)."),
    ] = None,
    hls: Annotated[bool, typer.Option("--hls", help="Package the ladder as HLS (fMP4).")] = False,
    dash: Annotated[bool, typer.Option("--dash", help="Package the ladder as DASH.")] = False,
    node: Annotated[
        str | None, typer.Option(help="Run on this node only (it must have a live worker).")
    ] = None,
    gpu_index: Annotated[
        int | None, typer.Option(help="With --node: run on this GPU (nvidia-smi index) only.")
    ] = None,
    copy: Annotated[
        bool, typer.Option(help="Copy inputs from outside the media root into it first.")
    ] = True,
    wait: Annotated[bool, typer.Option("--wait", help="Draw progress until the jobs end.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Queue even if the same job is queued or running.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
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
        batch_only = {"priority": priority}
        others = {**{k: v for k, v in params.items() if k != "priority"}, "node": node,
                  "gpu_index": gpu_index, "force": force or None}  # fmt: skip
        cli_inference.submit_batches(files, output, batch_only, wait, timeout, as_json, others)
        return
    client = Client(Settings())
    prepared: list[PreparedJob] = []
    for file in files:
        given = file if file.is_absolute() else Path.cwd() / file
        if file.name.startswith("-"):
            raise InvalidSpec(f"input file name {file.name!r} must not start with '-'")
        out = None if output is None else (output if output.is_absolute() else Path.cwd() / output)
        prepared.append(client.prepare_transcode(given, out, copy_outside=copy, **params))
    queue = client.route(node, gpu_index)  # before anything is queued: a dead target fails
    jobs = client.enqueue_many(prepared, force=force, queue=queue)  # pipelined, per batch
    if not wait:
        for job in jobs:
            if as_json:
                console.print_json(record_json(job.status()))
            else:
                console.print(
                    f"queued {job.id}  {job.status().spec['input']}", markup=False, soft_wrap=True
                )  # soft_wrap: a path is never folded at the console's width
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
