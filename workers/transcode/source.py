"""The input's facts (gpujobs.media.probe with its first frame), read once per version of a file
in each worker process.

Several jobs often read one input: the renditions of a ladder submitted one by one, the pieces of
a split job, a retry, the same source encoded at several sizes. A full probe costs this worker
1 to 2 ms of CPU (libavformat's stream search and one decoded frame) and a transcode of a short
clip takes a few tens; the second job on a file reuses the first one's facts. A version is
`gpujobs.media.file_version` (what the producer's `input_verdict` keys its memory by), so a
changed file is always read again.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from gpujobs.media import MediaInfo, file_version, probe

CACHED_VERSIONS = 64  # files' facts kept per worker process (a few KB each)


def probe_source(path: Path) -> MediaInfo:
    """`probe(path)` (first frame included), from this process's cache when the file has not
    changed since it was last read. Raises ProbeError as probe does (a failure is not kept), and
    OSError when the file cannot be stat'ed."""
    return _probe_version(str(path), file_version(os.stat(path)))


@functools.lru_cache(maxsize=CACHED_VERSIONS)
def _probe_version(path: str, version: tuple[int, ...]) -> MediaInfo:
    return probe(Path(path))
