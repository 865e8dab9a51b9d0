"""Checks on where a job may run, made at submit from the nodes' heartbeats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpujobs.errors import InvalidSpec


def require_gpu_worker(
    policy: str,
    heartbeats: Callable[[], dict[str, dict[str, Any]]],
    node: str | None,
    gpu: int | None,
) -> None:
    """For a job whose gpu policy is "require": InvalidSpec unless a live worker (on `node`, and
    GPU `gpu` of it, when given) has a GPU that can encode (NVENC), as its heartbeat says. Any
    other policy: nothing is read.

    heartbeats: returns node name -> heartbeat (`Client.heartbeats`; see workers/heartbeat.py)."""
    if policy != "require":
        return
    beats = heartbeats()
    where = {node: beats[node]} if node is not None and node in beats else beats
    if not any(
        entry.get("capabilities", {}).get("nvenc")
        for beat in where.values()
        for entry in beat.get("gpus", [])
        if gpu is None or entry.get("index") == gpu
    ):
        place = f"on node {node!r}" if node is not None else "in the cluster"
        raise InvalidSpec(
            f"--gpu require: no live worker {place} has a GPU that can encode "
            "(gpujobs gpus lists them); use --gpu auto to allow the CPU"
        )
