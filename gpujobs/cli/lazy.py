"""The `gpujobs` command group, its subcommands imported when they run.

`gpujobs --help` lists every command with its one-line help from COMMANDS, a table, so a start
imports typer and the module of the command being run, not all of the CLI (and not rich).
tests/test_layout.py checks the table against the real commands.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

MAIN = "gpujobs.cli.main"
# Every command in `--help` order: the module whose `register(app)` adds it (MAIN: defined on
# the app itself) and its one-line help, as Click shortens the command's docstring.
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("gpujobs.cli.transcode",
               "Queue a transcode for each FILE (all are checked before any is queued)."),
    "status": (MAIN, "Show one job's record and how each attempt ended."),
    "watch": (MAIN, "Follow jobs live until they end; exits non-zero if any did not succeed."),
    "ls": (MAIN, "List jobs, newest first."),
    "cancel": (MAIN, "Cancel queued or running jobs (a running transcode is killed, its partial "
                     "output removed)."),
    "worker": (MAIN,
               "Run a worker in the foreground (needs the worker extra); --gpus: one per GPU."),
    "up": (MAIN, "Start the embedded local stack (Valkey + a worker) if it is not running."),
    "down": (MAIN,
             "Stop the embedded local stack (a running job finishes or is handed back first)."),
    "demo": (MAIN, "Generate a 1080p clip with audio and transcode it to 480p on this machine."),
    "gpus": ("gpujobs.cli.gpu",
             "Nodes, their GPUs and what each can do, busy NVENC slots and running jobs."),
    "doctor": ("gpujobs.cli.gpu", "Check this node: driver, NVENC/NVDEC libraries, ffmpeg, a "
               "test encode per path, the broker, the vLLM endpoint, swap."),
    "flower": ("gpujobs.cli.monitor", "Run Flower for the gpujobs queues (basic auth from "
               "GPUJOBS_FLOWER_USER/PASSWORD)."),
    "metrics": ("gpujobs.cli.monitor", "Serve Prometheus metrics (queues, jobs, NVENC slots, "
                "GPUs, inference) on /metrics."),
    "top": ("gpujobs.cli.monitor", "Live view of nodes, GPUs and jobs (jobs update from Redis "
            "events as they happen)."),
    "infer": ("gpujobs.cli.inference", "Queue a batch inference job for each FILE (all are "
              "checked before any is queued)."),
    "results": ("gpujobs.cli.inference",
                "Say where a job's output is (or stream it with --stream)."),
    "api": ("gpujobs.cli.api",
            "Serve the OpenAI Batch API (/v1/files, /v1/batches) over the gpujobs queue."),
    "logs": ("gpujobs.cli.logs", "Print a job's logs, oldest attempt first (a transcode's: "
             "ffmpeg's whole stderr)."),
    "retry": ("gpujobs.cli.housekeeping",
              "Queue a failed or cancelled job again as a new job with the same spec."),
    "clean": ("gpujobs.cli.housekeeping",
              "Remove inbox copies and finished job records older than DAYS."),
    "cluster": ("gpujobs.cli.cluster", "The gpujobs deployment in Kubernetes: GPU nodes, pods, "
                "queues, vLLM replicas."),
}  # fmt: skip


class LazyGroup(TyperGroup):
    """A typer group whose commands outside MAIN are built on first use (`get_command`)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = self.commands.get(cmd_name)
        if found is None and COMMANDS.get(cmd_name, (MAIN, ""))[0] != MAIN:
            found = self._load(COMMANDS[cmd_name][0], cmd_name)
        return found

    def _load(self, module_name: str, cmd_name: str) -> Any:
        """Import `module_name`, add the commands its `register` makes; the one named."""
        holder = typer.Typer(rich_markup_mode=None, add_completion=False)
        importlib.import_module(module_name).register(holder)
        for name, command in typer.main.get_group(holder).commands.items():
            self.commands[name] = readable(command)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Click's command list, each line from COMMANDS: nothing is imported to draw it."""
        from typer._click.utils import make_default_short_help

        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, make_default_short_help(words, limit)) for name, (_, words) in
                COMMANDS.items()]  # fmt: skip
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def readable(command: Any) -> Any:
    """Help placeholders a reader understands: `--chunk-size CHUNK_SIZE`, not `<int>`, and an
    argument's name alone (`ID...`), for every option that does not name its own.

    command: the Click command typer built (typer ships its own Click, so duck-typed)."""
    for sub_command in getattr(command, "commands", {}).values():
        readable(sub_command)
    for param in command.params:
        if param.param_type_name == "argument":
            # typer appends the Python type (`<list[str]>`) after the name; the name says it.
            param.display_type_rich = lambda ctx: None
            if param.metavar is None:
                param.metavar = (param.name or "value").upper()
        elif param.param_type_name == "option" and not param.is_flag and param.metavar is None:
            param.metavar = (param.name or "value").upper()
    return command
