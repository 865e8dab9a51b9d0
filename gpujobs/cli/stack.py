"""The local stack's process, `python -m gpujobs.cli.stack`, started by `gpujobs.local`.

It runs the core's stack (`local.serve`: Valkey and a supervised worker) with the monitor's
Flower. It lives in the CLI wing because it joins the two: the core never imports the monitor.
"""

from __future__ import annotations

from gpujobs import local
from gpujobs.config import Settings
from gpujobs.monitor.flower import stack_flower


def main() -> None:
    """Serve the stack until SIGTERM (see `gpujobs.local.serve`)."""
    local.serve(Settings(), plan_flower=stack_flower)


if __name__ == "__main__":
    main()
