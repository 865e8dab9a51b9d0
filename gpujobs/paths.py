"""Paths a user gives, as paths under the media root (the folder producers and workers share)."""

from __future__ import annotations

from pathlib import Path

from gpujobs.errors import InvalidSpec


def media_relative(given: Path, media: Path, what: str) -> str:
    """`given` (absolute, or relative to the media root) as a POSIX path relative to the media
    root. InvalidSpec when it contains `..`, lies outside the root, or is a directory. `what`
    names the path in the message ("output")."""
    if ".." in given.parts:
        raise InvalidSpec(f"{what} path {str(given)!r} must not contain '..'")
    path = given.expanduser()
    if not path.is_absolute():
        path = media / path
    root = media.resolve()
    # The folder is resolved (symlinks included), the file name is not: it may not exist yet.
    resolved = path.parent.resolve() / path.name
    if not resolved.is_relative_to(root):
        raise InvalidSpec(f"{what} {given} is outside the media root {root}")
    if resolved.is_dir():
        raise InvalidSpec(f"{what} {given} is a directory")
    return resolved.relative_to(root).as_posix()
