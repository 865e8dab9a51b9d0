"""Paths a user gives, as paths under the media root (the folder producers and workers share)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from gpujobs.errors import InvalidSpec


def media_relative(
    given: Path | str,
    media: Path,
    what: str,
    root: Path | None = None,
    resolve_dir: Callable[[str], str] = os.path.realpath,
) -> str:
    """`given` (absolute, or relative to the media root) as a POSIX path relative to the media
    root. InvalidSpec when it contains `..`, lies outside the root, or is a directory. `what`
    names the path in the message ("output"). root: `media` resolved, if the caller has it;
    resolve_dir: how to resolve a folder (a bulk submit resolves each folder once).

    Written with os.path, not pathlib: a bulk submit runs it once a job, and pathlib's parsing
    made it three times as slow (Python 3.11)."""
    text = os.fspath(given)
    if ".." in text.split("/"):
        raise InvalidSpec(f"{what} path {text!r} must not contain '..'")
    path = os.path.normpath(os.path.join(media, os.path.expanduser(text)))
    top = os.fspath(root or media.resolve())
    # The folder is resolved (symlinks included), the file name is not: it may not exist yet.
    folder, name = os.path.split(path)
    resolved = os.path.join(resolve_dir(folder), name)
    inside = below(resolved, top)
    if inside is None:
        raise InvalidSpec(f"{what} {text} is outside the media root {top}")
    if os.path.isdir(resolved):
        raise InvalidSpec(f"{what} {text} is a directory")
    return inside


def pure_posix(path: str) -> str:
    """`path` as PurePosixPath writes it: repeated slashes, `.` parts and a trailing slash
    dropped, `..` kept (a link's parent is not resolved away), a leading `//` kept as POSIX
    allows. Written with str operations: a bulk submit runs it once a job."""
    parts = "/".join(part for part in path.split("/") if part not in ("", "."))
    if path.startswith("//") and not path.startswith("///"):
        return "//" + parts
    if path.startswith("/"):
        return "/" + parts
    return parts or "."


def below(path: str, root: str) -> str | None:
    """Absolute, normalised `path` relative to `root` ("" for the root itself), or None when
    it lies outside (no file is read: resolve links first)."""
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


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
