"""`gpujobs top`: a live terminal view of nodes, GPUs and jobs, driven by Redis events.

Job rows change when the store publishes a record (a pattern subscription on every job channel,
`keys.ALL_JOB_EVENTS`): no polling for job updates. Nodes and GPUs come from heartbeats, which
are keys with a TTL and no channel, so they (and the queue depths) are re-read every
`node_refresh_s` seconds, the heartbeat's own pace.

`render_top` builds the renderable from a `TopView` alone, so a test renders it to a string.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field

import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gpujobs import keys
from gpujobs.cli.render import STATE_STYLES, job_subject, short_duration
from gpujobs.errors import BrokerUnreachable
from gpujobs.monitor.metrics import ClusterSnapshot, NodeStat, read_snapshot
from gpujobs.specs import JobRecord, JobState
from gpujobs.store import JobStore, parse_published

ACTIVE = (JobState.RUNNING, JobState.QUEUED)
RECENT_KEPT = 5  # finished jobs shown under the active ones
ACTIVE_SHOWN = 30  # active jobs listed at most (running first)
BAR_WIDTH = 24


@dataclass
class TopView:
    """What `gpujobs top` shows: the cluster snapshot, active jobs, the last finished ones."""

    snapshot: ClusterSnapshot
    active: dict[str, JobRecord] = field(default_factory=dict)
    recent: deque[JobRecord] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT))
    updates: int = 0  # job events applied since the view was built

    def apply(self, record: JobRecord) -> None:
        """Take one published record: an active job is (re)placed, a finished one moves down."""
        self.updates += 1
        if record.state.terminal:
            self.active.pop(record.id, None)
            self.recent = deque([r for r in self.recent if r.id != record.id], maxlen=RECENT_KEPT)
            self.recent.appendleft(record)
        else:
            self.active[record.id] = record


def _bar(percent: float, style: str = "cyan") -> ProgressBar:
    return ProgressBar(
        total=100.0, completed=max(0.0, min(100.0, percent)), width=BAR_WIDTH,
        complete_style=style, finished_style="green",
    )  # fmt: skip


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.1f}"


def _summary(view: TopView, now: float) -> Text:
    snapshot = view.snapshot
    running = sum(1 for r in view.active.values() if r.state is JobState.RUNNING)
    queued = sum(1 for r in view.active.values() if r.state is JobState.QUEUED)
    queues = ", ".join(f"{name} {count}" for name, count in sorted(snapshot.queues.items()))
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    return Text.assemble(
        ("gpujobs top", "bold"),
        f"  {clock}  nodes {len(snapshot.nodes)}  running {running}  queued {queued}",
        f"  queues: {queues or '-'}",
    )


def nodes_table(nodes: list[NodeStat], nvenc: dict[str, int]) -> Table:
    """A row per GPU of each node (one row for a node without GPUs)."""
    table = Table(title="Nodes and GPUs", title_justify="left", box=None, header_style="bold")
    for column in ("NODE", "GPU", "NAME", "UTIL", "", "MEM GiB", "NVENC", "WORKERS", "JOBS",
                   "BEAT"):  # fmt: skip
        table.add_column(column, no_wrap=True)
    if not nodes:
        table.add_row("[dim]no node heartbeats[/]")
    for node in nodes:
        slots = nvenc.get(node.node) or node.nvenc_slots_in_use or 0
        common = [str(slots), str(len(node.workers)), str(len(node.running_jobs)),
                  short_duration(node.age_s) + " ago"]  # fmt: skip
        # Names come from other processes: escaped, so a `[` in one is text, not markup.
        name = escape(node.node)
        if not node.gpus:
            table.add_row(name, "-", "[dim]cpu only[/]", "", "", "-", *common)
        for gpu in node.gpus:
            util = gpu.utilization_pct
            table.add_row(
                name,
                str(gpu.index),
                escape(gpu.name or "-"),
                _bar(util or 0.0, "magenta") if util is not None else "",
                "-" if util is None else f"{util:3.0f}%",
                f"{_gib(gpu.memory_used_mb)}/{_gib(gpu.memory_total_mb)}",
                *common,
            )
    return table


def jobs_table(view: TopView, now: float) -> Table:
    """Active jobs (running first, then queued by age) with bars, then the last finished."""
    table = Table(title="Jobs", title_justify="left", box=None, header_style="bold")
    for column in ("ID", "KIND", "STATE", "PROGRESS", "", "FPS", "SPEED", "ETA", "WHERE",
                   "INPUT"):  # fmt: skip
        table.add_column(column, no_wrap=column != "INPUT")
    order = sorted(
        view.active.values(),
        key=lambda r: (r.state is not JobState.RUNNING, r.created_at),
    )
    for record in [*order[:ACTIVE_SHOWN], *view.recent]:
        style = STATE_STYLES[record.state]
        where = f"{record.node}/{record.gpu}" if record.node else (record.worker or "-")
        # Paths and ffmpeg's errors (`[h264_nvenc @ 0x...]`) are text, not rich markup.
        detail = escape(job_subject(record))
        if record.state is JobState.FAILED and record.error:
            detail = f"{detail}  [red]{escape(record.error)}[/]"
        table.add_row(
            record.id,
            record.kind.value,
            f"[{style}]{record.state.value}[/]",
            _bar(record.percent, style),
            f"{record.percent:5.1f}%",
            f"{record.fps:.0f}" if record.fps else "-",
            f"{record.speed:.2f}x" if record.speed else "-",
            short_duration(record.eta_s) if record.state is JobState.RUNNING else "-",
            escape(where)
            if record.state is not JobState.QUEUED
            else short_duration(now - record.created_at),
            detail,
        )
    if not order and not view.recent:
        table.add_row("[dim]no jobs[/]")
    return table


def render_top(view: TopView, now: float | None = None) -> RenderableType:
    """The whole screen for one view. now: Unix seconds (default: the snapshot's time)."""
    now = view.snapshot.at if now is None else now
    return Group(
        _summary(view, now),
        Text(""),
        nodes_table(view.snapshot.nodes, view.snapshot.nvenc_in_use),
        Text(""),
        jobs_table(view, now),
    )


def render_text(view: TopView, width: int = 160) -> str:
    """The view as plain text (no colour), as a test or a log reads it."""
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(render_top(view))
    return console.export_text()


def follow(
    client: redis.Redis, node_refresh_s: float = 2.0, timeout_s: float | None = None
) -> Generator[TopView, None, None]:
    """Yield the view now, then after every job event and every node refresh.

    Subscribes before the first read, so no update falls between the two. node_refresh_s:
    seconds between two reads of heartbeats and queues (default 2). timeout_s: stop after this
    many seconds (None: never).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
    try:
        pubsub.psubscribe(keys.ALL_JOB_EVENTS)
        store = JobStore(client)
        view = TopView(snapshot=read_snapshot(client))
        for record in reversed(store.list(limit=500, states=ACTIVE)):
            view.active[record.id] = record
        for record in store.list(limit=RECENT_KEPT, states=[s for s in JobState if s.terminal]):
            view.recent.append(record)
        yield view
        next_refresh = time.monotonic() + node_refresh_s
        while deadline is None or time.monotonic() < deadline:
            wait = next_refresh - time.monotonic()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            message = pubsub.get_message(timeout=max(0.0, wait))
            if message is not None:
                update = parse_published(message.get("data"))
                if update is not None:
                    view.apply(update)
                    yield view
            if time.monotonic() >= next_refresh:
                view.snapshot = read_snapshot(client)
                next_refresh = time.monotonic() + node_refresh_s
                yield view
    finally:
        pubsub.close()


def run_top(
    client: redis.Redis,
    console: Console,
    once: bool = False,
    frames: int | None = None,
    timeout_s: float | None = None,
    node_refresh_s: float = 2.0,
) -> None:
    """Draw the view until interrupted (or `frames` views, or `timeout_s` seconds).

    On a terminal the screen is redrawn in place (rich Live, at most 4 times a second); on a
    pipe each view is printed in turn, so a log or a test reads every frame.
    once: print one view and return.
    """
    views = follow(client, node_refresh_s=node_refresh_s, timeout_s=timeout_s)
    try:
        if once:
            console.print(render_top(next(views), time.time()))
            return
        shown = 0
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4, screen=False) as live:
                for view in views:
                    live.update(render_top(view, time.time()))
                    shown += 1
                    if frames is not None and shown >= frames:
                        break
            return
        for view in views:
            console.print(render_top(view, time.time()))
            console.rule()
            shown += 1
            if frames is not None and shown >= frames:
                break
    except redis.RedisError as exc:  # the broker went away while top ran: one line, no traceback
        raise BrokerUnreachable(f"lost the broker: {exc}") from None
    finally:
        views.close()
