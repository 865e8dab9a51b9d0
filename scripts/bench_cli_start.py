"""How fast the `gpujobs` command starts: `--help`, and `ls` against no broker, against two
baselines measured in the same run: a bare interpreter, and `--help` with the SDK imported
first (what every start cost before the imports were made lazy).

    .venv/bin/python scripts/bench_cli_start.py --runs 15

Each line prints the median wall time of its command over the runs (they alternate, one
warm-up of each not counted) and its ratio to the bare interpreter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HELP = "from gpujobs.cli.main import main; main()"
EAGER = "import gpujobs.client, gpujobs.batch; from gpujobs.cli.main import main; main()"


def timed(args: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)  # fmt: skip
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    state = tempfile.mkdtemp(prefix="gpujobs-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    env["GPUJOBS_STATE_DIR"] = state  # no stack there: `ls` says so and exits 3
    py = sys.executable
    commands = {
        "python -c pass (baseline)": [py, "-c", "pass"],
        "gpujobs --help": [py, "-c", HELP, "--help"],
        "gpujobs ls (no stack)": [py, "-c", HELP, "ls"],
        "--help, SDK imported first (before)": [py, "-c", EAGER, "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for run in range(runs + 1):
        for name, args in commands.items():
            took = timed(args, env)
            if run:  # the first round warms the disk cache
                times[name].append(took)
    base = statistics.median(times["python -c pass (baseline)"])
    print(f"| {runs} runs | median | over bare python |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1000:.0f} ms | +{(median - base) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
