"""`gpujobs gpus`, `gpujobs doctor` and `gpujobs worker --check`: the GPU side of the CLI.

`gpus` and `--check` read node heartbeats from Redis and need neither ffmpeg nor a GPU; `doctor`
and `gpus --local` measure this machine and need the worker extra.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpujobs.errors import GpujobsError

if TYPE_CHECKING:
    from gpujobs.config import Settings

console = Console()


class StaleHeartbeat(GpujobsError):
    """`gpujobs worker --check`: this node's workers have not written a heartbeat lately."""

    exit_code = 1


def _yes(value: object) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"


def _mb(value: object) -> str:
    return "?" if not isinstance(value, int | float) else f"{value / 1024:.1f}"


def _model(name: str) -> str:
    """`NVIDIA GeForce RTX 5090` -> `RTX 5090`, `NVIDIA H200` -> `H200`: the part that differs."""
    for prefix in ("NVIDIA ", "GeForce "):
        name = name.removeprefix(prefix)
    return name


def _can(caps: dict[str, Any]) -> str:
    names = [name for key, name in (("nvenc", "nvenc"), ("cuda_decode", "nvdec"),
                                    ("scale_cuda", "scale")) if caps.get(key)]  # fmt: skip
    return "+".join(names) if names else "[red]cpu only[/]"


def gpus_table(beats: dict[str, dict[str, Any]], now: float | None = None) -> Table:
    """One row per GPU (or per CPU-only node) from the nodes' heartbeats. Fits 80 columns:
    short headers, no box; numbers and capabilities never wrap, long names wrap in their cells.

    can: what the GPU does for ffmpeg (nvenc encode, nvdec decode, scale_cuda); slots: NVENC
    sessions in use on the node; jobs: the ids of its running jobs."""
    now = time.time() if now is None else now
    table = Table(title="GPU workers", title_justify="left", box=None, header_style="bold",
                  padding=(0, 1), pad_edge=False, collapse_padding=True)  # fmt: skip
    fixed = {"gpu": 3, "memory GiB": 10, "util": 4, "can": 9, "slots": 5, "seen": 4}
    for column in ("node", "gpu", "name", "memory GiB", "util", "can", "workers", "slots",
                   "jobs", "seen"):  # fmt: skip
        # The short columns never wrap; names wrap within their cells when space runs out.
        table.add_column(column, no_wrap=column in fixed, overflow="fold",
                         min_width=fixed.get(column))  # fmt: skip
    for name, beat in sorted(beats.items()):
        node = escape(name)  # names from other processes are text, not rich markup
        workers = [escape(str(w)) for w in beat.get("workers", [])]
        running = ", ".join(escape(str(j)) for j in beat.get("running_jobs", [])) or "-"
        age = f"{max(0.0, now - float(beat.get('ts', now))):.0f}s"
        slots = str(beat.get("nvenc_slots_in_use", 0))
        gpus = beat.get("gpus", [])
        if not gpus:
            table.add_row(node, "-", "(no GPU: CPU only)", "", "", "", ", ".join(workers), slots,
                          running, age)  # fmt: skip
            continue
        for gpu in gpus:
            mine = [w for w in workers if w.endswith(f".gpu{gpu.get('index')}")]
            used, total = gpu.get("memory_used_mb"), gpu.get("memory_total_mb")
            util = gpu.get("utilization_pct")
            table.add_row(
                node, str(gpu.get("index")), escape(_model(str(gpu.get("name")))),
                f"{_mb(used)} / {_mb(total)}", "?" if util is None else f"{util}%",
                _can(gpu.get("capabilities", {})), ", ".join(mine) or "[red]none[/]", slots,
                running, age,
            )  # fmt: skip
    return table


def check_heartbeat(settings: Settings | None = None) -> None:
    """The liveness probe: StaleHeartbeat unless this node's heartbeat is younger than
    heartbeat_ttl_s (default 30 s). Never starts the local stack."""
    from gpujobs.client import Client
    from gpujobs.config import Settings

    settings = settings or Settings()
    node = settings.node_name
    beat = Client(settings, start_local=False).heartbeats().get(node)
    if beat is None:
        raise StaleHeartbeat(f"node {node} has no heartbeat (is its worker running?)")
    age = time.time() - float(beat.get("ts", 0))
    if age > settings.heartbeat_ttl_s:
        raise StaleHeartbeat(
            f"node {node}'s heartbeat is {age:.0f} s old (limit {settings.heartbeat_ttl_s:g} s)"
        )
    console.print(
        f"ok: {node} heartbeat {age:.1f} s old, {len(beat.get('workers', []))} worker(s)",
        markup=False,
    )


def _local_rows() -> Table:
    """This machine's GPUs, measured now (needs the worker extra)."""
    from gpujobs.config import Settings

    try:
        from workers.gpu.discovery import list_gpus, measure
    except ImportError as exc:
        raise GpujobsError(f"--local needs the worker extra ({exc.name} is missing)") from None
    ffmpeg = Settings().ffmpeg_binary()
    table = Table(title="GPUs on this machine (measured now)", title_justify="left")
    for column in ("gpu", "uuid", "name", "memory GiB", "driver", "nvenc", "nvdec", "scale_cuda"):
        table.add_column(column, overflow="fold")
    for gpu in list_gpus():
        caps = measure(ffmpeg, gpu)
        table.add_row(
            str(gpu.index), gpu.uuid, gpu.name,
            f"{_mb(gpu.memory_used_mb)} / {_mb(gpu.memory_total_mb)}", gpu.driver_version,
            _yes(caps.nvenc), _yes(caps.cuda_decode), _yes(caps.scale_cuda),
        )  # fmt: skip
    return table


def gpus(
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Measure this machine's GPUs instead of reading the workers' heartbeats.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The heartbeats as JSON.")] = False,
) -> None:
    """Nodes, their GPUs and what each can do, busy NVENC slots and running jobs."""
    from gpujobs.client import Client
    from gpujobs.config import Settings

    if local:
        table = _local_rows()
        if not table.row_count:
            console.print("no NVIDIA GPU found on this machine (nvidia-smi finds none)")
            return
        console.print(table)
        return
    beats = Client(Settings(), start_local=False).heartbeats()
    if as_json:
        console.print_json(data=beats)
    elif not beats:
        console.print("no worker has a live heartbeat (start one: gpujobs worker --gpus all)")
    else:
        console.print(gpus_table(beats))


def doctor() -> None:
    """Check this node: driver, NVENC/NVDEC libraries, ffmpeg, a test encode per path, the
    broker, the vLLM endpoint, swap. Exits non-zero when a check fails."""
    from gpujobs.config import Settings

    try:
        from workers.gpu.doctor import run_checks, verdict
    except ImportError as exc:
        raise GpujobsError(f"doctor needs the worker extra ({exc.name} is missing)") from None
    colors = {"PASS": "green", "FAIL": "red", "SKIP": "dim"}
    checks = []
    for check in run_checks(Settings()):
        checks.append(check)
        line = f"[{colors[check.mark]}]{check.mark}[/] {escape(check.name)}: {escape(check.detail)}"
        if check.mark != "PASS" and check.fix:
            line += f" [yellow]fix:[/] {escape(check.fix)}"
        console.print(line, soft_wrap=True, highlight=False)
    console.print(verdict(checks), soft_wrap=True, highlight=False, markup=False)
    failed = sum(check.mark == "FAIL" for check in checks)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `gpus` and `doctor` to the gpujobs command."""
    app.command("gpus")(gpus)
    app.command("doctor")(doctor)
