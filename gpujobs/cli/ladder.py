"""`gpujobs submit --ladder 1080,720,480 --hls|--dash`: queue ABR ladders (gpujobs/ladder.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpujobs.cli.render import console, exit_for, follow, record_json, start_stack
from gpujobs.errors import InvalidSpec

if TYPE_CHECKING:
    pass


def ladder_options(ladder: str | None, hls: bool, dash: bool) -> tuple[list[int], str] | None:
    """The renditions and package asked for, or None when no ladder was asked for.
    `--hls`/`--dash` alone mean the default ladder; `--ladder` alone means HLS."""
    from gpujobs.ladder import DEFAULT_RENDITIONS, parse_renditions

    if hls and dash:
        raise InvalidSpec("--hls and --dash are two ladders; submit each on its own")
    if ladder is None and not (hls or dash):
        return None
    try:
        heights = list(DEFAULT_RENDITIONS) if ladder is None else parse_renditions(ladder)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None
    return heights, "dash" if dash else "hls"


def submit_ladders(
    files: list[Path],
    output: Path | None,
    ladder: tuple[list[int], str],
    params: dict[str, Any],
    transcode_only: dict[str, Any],
    copy: bool,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Check a ladder for every FILE, then queue them; with `wait`, draw progress until they end.

    transcode_only: options of `gpujobs submit` that mean nothing to a ladder; any given is an
    error rather than silently ignored.
    """
    from gpujobs import ladder as ladder_sdk
    from gpujobs.client import Client
    from gpujobs.config import Settings
    from gpujobs.specs import JobState

    given = [name for name, value in transcode_only.items() if value is not None]
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        verb = "does" if len(given) == 1 else "do"
        raise InvalidSpec(f"{flags} {verb} not apply to a ladder (its heights come from --ladder)")
    renditions, package = ladder
    client = Client(Settings())
    prepared = []
    givens = [file if file.is_absolute() else Path.cwd() / file for file in files]
    client.read_inputs(givens)  # every new file's header read at once, on every core
    for given_path in givens:
        out = None if output is None else (output if output.is_absolute() else Path.cwd() / output)
        prepared.append(ladder_sdk.prepare(
            client, given_path, out, copy, renditions=renditions, package=package, **params
        ))  # fmt: skip
    start_stack(client.settings)  # every file checked: now the broker
    jobs = [ladder_sdk.enqueue_prepared(client, spec, copy_from) for spec, copy_from in prepared]
    if not wait:
        for job in jobs:
            if as_json:
                console.print_json(record_json(job.status()))
            else:
                spec = job.status().spec
                console.print(f"queued {job.id}  {spec['input']} -> {spec['output']}", markup=False)
        return
    records = follow(client, [job.id for job in jobs], timeout)
    for record in records:
        if as_json:
            console.print_json(record_json(record))
        elif record.state is JobState.SUCCEEDED:
            entry = (record.result or {}).get("entry", record.output)
            console.print(f"{record.id} succeeded: {client.settings.media / str(entry)}")
    exit_for(records)
