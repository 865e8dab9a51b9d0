"""A worker reads an input's facts once per version of the file: the same file again is not
probed again, and a file changed in any way (rewritten in place, replaced by a rename) is."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gpujobs.media import ProbeError
from workers.transcode.source import probe_source


def test_the_same_file_is_read_once_and_a_changed_one_again(
    tmp_path: Path, clip_cache: Callable[..., Path]
) -> None:
    small, large = clip_cache(seconds=0.5, size="320x180"), clip_cache(seconds=0.5, size="640x360")
    path = tmp_path / "in.mp4"
    shutil.copyfile(small, path)
    first = probe_source(path)
    assert first.video is not None and first.video.width == 320
    assert probe_source(path) is first  # unchanged: the facts kept
    # Rewritten in place with another picture, the old mtime put back: the ctime still moved.
    stamp = path.stat()
    path.write_bytes(large.read_bytes())
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = probe_source(path)
    assert second.video is not None and second.video.width == 640
    # Replaced by a rename (a new inode), as an upload tool does.
    staged = tmp_path / "staged.mp4"
    shutil.copyfile(small, staged)
    staged.replace(path)
    third = probe_source(path)
    assert third.video is not None and third.video.width == 320


def test_a_file_that_cannot_be_read_is_not_remembered(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all")
    with pytest.raises(ProbeError):
        probe_source(path)
    with pytest.raises(ProbeError):  # read again, not a kept answer
        probe_source(path)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        probe_source(path)
