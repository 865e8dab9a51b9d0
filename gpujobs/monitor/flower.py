"""Flower for gpujobs: how jobs read in it, and starting it with auth and persistent state.

How a job reads in Flower:

- its task name is its kind (`gpujobs.transcode`, `gpujobs.inference_chunk`);
- its arguments are a one-line brief of the spec (`gpujobs.app.task_argsrepr`, sent as Celery's
  `argsrepr`),
  not the raw `[job_id, {...}]`;
- while it runs, its state is PROGRESS and its Result column says how far it is: the worker
  relays the job's record updates as custom `task-progress` events (workers/flower_progress.py);
- a failed job's Exception column is the reason gpujobs recorded (the worker raises it after
  recording it).

Flower itself runs through its own Celery command (`celery flower`) on the gpujobs app. Settings
are the one source of its options: FLOWER_* variables are dropped, the credentials reach Flower in
its process environment (never on the command line, where `ps` shows them), and `--conf` points
at the null device so that no `flowerconfig.py` in the working directory is executed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from gpujobs.config import Settings
from gpujobs.errors import GpujobsError

log = logging.getLogger(__name__)

# The columns of Flower's Tasks page: the brief (args), the progress or result, the reason.
TASK_COLUMNS = "name,uuid,state,args,result,exception,runtime,worker,received"
STATE_DB = "flower.db"


class FlowerConfigError(GpujobsError):
    """Flower's settings are unsafe or inconsistent (say, a public address without auth)."""

    exit_code = 2


def is_loopback(address: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, `localhost`.

    An empty address or 0.0.0.0 means every interface, which is not loopback.
    """
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def basic_auth(settings: Settings, address: str) -> str | None:
    """`user:password` for Flower's basic auth, None when none is configured.

    Raises FlowerConfigError (one line) when only one of user and password is set, when either
    holds a character Flower's option cannot carry, or when `address` is not loopback and no
    credentials are set: an open Flower can revoke and terminate jobs.
    """
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else None
    if bool(user) != bool(password):
        raise FlowerConfigError(
            "set both GPUJOBS_FLOWER_USER and GPUJOBS_FLOWER_PASSWORD, or neither"
        )
    if not user or not password:
        if not is_loopback(address):
            raise FlowerConfigError(
                f"refusing to serve Flower on {address or 'all interfaces'} without auth: "
                "set GPUJOBS_FLOWER_USER and GPUJOBS_FLOWER_PASSWORD, or listen on 127.0.0.1"
            )
        return None
    # Flower splits its basic-auth option on commas and each entry on the first colon.
    if ":" in user or "," in user or "," in password:
        raise FlowerConfigError(
            "GPUJOBS_FLOWER_USER must not contain ':' or ',', nor the password ','"
        )
    return f"{user}:{password}"


def state_db(settings: Settings) -> Path:
    """Where Flower keeps its persistent state: `<state_dir>/flower/flower.db`."""
    return settings.state_dir / "flower" / STATE_DB


def flower_argv(settings: Settings, address: str, port: int) -> list[str]:
    """The `celery flower` arguments for gpujobs (no secrets: those go in the environment)."""
    interval_ms = max(1, round(settings.flower_state_save_interval_s * 1000))
    return [
        "flower",
        f"--address={address}",
        f"--port={port}",
        "--persistent=True",
        f"--db={state_db(settings)}",
        f"--state_save_interval={interval_ms}",
        f"--tasks_columns={TASK_COLUMNS}",
        f"--conf={os.devnull}",
    ]


def run_flower(
    settings: Settings, broker_url: str, address: str | None = None, port: int | None = None
) -> None:
    """Run Flower for the gpujobs app on `broker_url` in the foreground until SIGTERM/SIGINT.

    Blocks. The caller finds the broker (gpujobs.connection.broker_url): Flower never starts it.

    address: default settings.flower_address (127.0.0.1); port: default settings.flower_port
    (5555; 0 picks a free one, which Flower logs). The state is saved every
    settings.flower_state_save_interval_s seconds and on exit.
    """
    address = settings.flower_address if address is None else address
    port = settings.flower_port if port is None else port
    credentials = basic_auth(settings, address)
    try:
        import flower  # noqa: F401  (the monitor extra)
    except ImportError:
        raise GpujobsError("Flower is not installed: pip install 'gpujobs[monitor]'") from None
    from gpujobs.app import make_app

    app = make_app(settings, broker_url)
    state_db(settings).parent.mkdir(parents=True, exist_ok=True)
    for name in [n for n in os.environ if n.startswith("FLOWER_")]:
        del os.environ[name]  # settings are the one source of Flower's options
    if credentials is not None:
        os.environ["FLOWER_BASIC_AUTH"] = credentials
    try:
        app.start(argv=flower_argv(settings, address, port))
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise GpujobsError(
            f"cannot serve Flower on {address}:{port}: {exc.strerror or exc}"
        ) from None


def free_port(address: str, wanted: int) -> int:
    """`wanted` when it can be bound on `address` now, else a free port the system picks."""
    host = "127.0.0.1" if address in ("", "0.0.0.0") else address  # noqa: S104 (a probe only)
    for port in (wanted, 0) if wanted else (0,):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            bound: int = probe.getsockname()[1]
            return bound
    raise OSError(f"no free port on {host}")


def url_for(address: str, port: int) -> str:
    """The URL a browser on this machine opens for Flower on `address`:`port`."""
    host = "127.0.0.1" if address in ("", "0.0.0.0", "::") else address  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def stack_flower(settings: Settings) -> tuple[list[str], str] | None:
    """How the local stack runs Flower: the command and the URL it will answer on.

    The configured port when it is free, else any free one (a second stack on the machine, a
    test). None, with the reason logged, when Flower is not installed or its settings are unsafe:
    the stack then runs without it.
    """
    try:
        basic_auth(settings, settings.flower_address)
    except FlowerConfigError as exc:
        log.warning("local stack without Flower: %s", exc)
        return None
    try:
        import flower  # noqa: F401  (the monitor extra)
    except ImportError:
        log.warning("local stack without Flower: pip install 'gpujobs[monitor]'")
        return None
    try:
        port = free_port(settings.flower_address, settings.flower_port)
    except OSError as exc:  # an address this machine does not have: no reason to fail the stack
        log.warning("local stack without Flower: cannot listen on %s: %s",
                    settings.flower_address, exc)  # fmt: skip
        return None
    command = [sys.executable, "-m", "gpujobs", "flower", "--port", str(port)]
    return command, url_for(settings.flower_address, port)
