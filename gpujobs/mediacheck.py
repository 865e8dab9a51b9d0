"""A producer's cheap check that a file looks like a video container, without ffmpeg.

Producers need no ffmpeg, so this reads the first bytes only; the worker probes the file for real
and records why when ffmpeg cannot read it.
"""

from __future__ import annotations

from pathlib import Path

SNIFF_BYTES = 4096
# ISO base media (mp4, mov, m4v, 3gp): a box type at offset 4.
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"}


def looks_like_video(path: Path) -> bool:
    """True when the file starts like a container ffmpeg reads video from."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if len(head) < 12:
        return False
    if head[4:8] in _ISO_BOXES:
        return True
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska, WebM
        return True
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[0] == 0x47 and (len(head) < 189 or head[188] == 0x47):  # MPEG-TS sync bytes
        return True
    if head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")):  # MPEG-PS, MPEG-1/2 video
        return True
    if head.startswith((b"FLV", b"OggS", b"YUV4MPEG2")):
        return True
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):  # ASF / WMV
        return True
    return head.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))  # raw H.264/HEVC Annex B
