"""Paths a user gives, as paths under the media root (the folder producers and workers share)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from gpujobs.errors import InvalidSpec


def media_relative(
    given: Path,
    media: Path,
    what: str,
    root: Path | None = None,
    resolve_dir: Callable[[Path], Path] = Path.resolve,
) -> str:
    """`given` (absolute, or relative to the media root) as a POSIX path relative to the media
    root. InvalidSpec when it contains `..`, lies outside the root, or is a directory. `what`
    names the path in the message ("output"). root: `media` resolved, if the caller has it;
    resolve_dir: how to resolve a folder (a bulk submit resolves each folder once)."""
    if ".." in given.parts:
        raise InvalidSpec(f"{what} path {str(given)!r} must not contain '..'")
    path = given.expanduser()
    if not path.is_absolute():
        path = media / path
    root = root or media.resolve()
    # The folder is resolved (symlinks included), the file name is not: it may not exist yet.
    resolved = resolve_dir(path.parent) / path.name
    if not resolved.is_relative_to(root):
        raise InvalidSpec(f"{what} {given} is outside the media root {root}")
    if resolved.is_dir():
        raise InvalidSpec(f"{what} {given} is a directory")
    return resolved.relative_to(root).as_posix()


def inbox_target(source: Path, inbox: Path) -> Path:
    """Where a file from outside the media root goes: its name in the inbox, or a free variant
    (an existing file of the same size is taken to be the same file and reused)."""
    target = inbox / source.name
    counter = 1
    while target.exists() and target.stat().st_size != source.stat().st_size:
        target = inbox / f"{source.stem}-{counter}{source.suffix}"
        counter += 1
    return target


def copy_file(source: Path, target: Path) -> None:
    """Copy under a temporary name, then rename: a worker never reads half a file."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.copying")
    shutil.copyfile(source, partial)
    partial.replace(target)
