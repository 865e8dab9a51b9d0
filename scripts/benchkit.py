"""What the benchmarks share: starting a worker process and knowing when it is ready."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

READY_TIMEOUT_S = 60.0


def spawn_ready(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a Celery worker process (in its own session) and return once it logs "ready.";
    its output goes on to `log`. SystemExit names the log when it does not start in 60 s."""
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        with log.open("ab") as out:
            for line in proc.stdout:
                out.write(line)
                if b" ready." in line:
                    ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S):
        proc.kill()
        raise SystemExit(f"worker did not start; see {log}")
    return proc
