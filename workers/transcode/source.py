"""The input's facts (gpujobs.media.probe with its first frame), read once per version of a file
in each worker process.

Several jobs often read one input: the renditions of a ladder submitted one by one, the pieces of
a split job, a retry, the same source encoded at several sizes. A full probe costs this worker
1 to 2 ms of CPU (libavformat's stream search and one decoded frame) and a transcode of a short
clip takes a few tens; the second job on a file reuses the first one's facts.

A version is the file's identity and its change stamps: device, inode, size, mtime and ctime in
nanoseconds. Any write to the file, a rename over it or a copy in its place changes at least one
(ctime cannot be set back by a user), so a changed file is always read again.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from gpujobs.media import MediaInfo, probe

CACHED_VERSIONS = 64  # files' facts kept per worker process (a few KB each)


def probe_source(path: Path) -> MediaInfo:
    """`probe(path)` (first frame included), from this process's cache when the file has not
    changed since it was last read. Raises ProbeError as probe does (a failure is not kept), and
    OSError when the file cannot be stat'ed."""
    stat = os.stat(path)
    version = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return _probe_version(str(path), version)


@functools.lru_cache(maxsize=CACHED_VERSIONS)
def _probe_version(path: str, version: tuple[int, ...]) -> MediaInfo:
    return probe(Path(path))
