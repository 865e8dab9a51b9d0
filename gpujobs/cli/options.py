"""Checks of option values that several commands share, run by Click as each option is parsed
(a bad value is a usage error: one line, exit 2, before anything is queued)."""

from __future__ import annotations

import math

import typer


def positive_seconds(value: float | None) -> float | None:
    """A duration option (`--timeout`): None (unset) or a finite number of seconds above 0.
    Click's own bounds let NaN through (every comparison with it is false)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number of seconds above 0, got {value}")
    return value
