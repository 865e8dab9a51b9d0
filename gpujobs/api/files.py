"""Uploaded files (`POST /v1/files`, purpose `batch`) under `<media root>/api/files/`.

Each file is `<id>.jsonl` with its File object beside it as `<id>.json`. An upload is written
under a temporary name, checked line by line as a batch (gpujobs/batch.py, the same checks
`gpujobs infer` makes) and only then renamed into place: a bad file is refused with the line at
fault and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from gpujobs.api.errors import ApiError, not_found
from gpujobs.batch import BatchFile
from gpujobs.errors import InvalidSpec

FILES_DIR = "api/files"  # under the media root
UPLOAD_ID = re.compile(r"^file-[0-9a-f]{24}$")
COPY_BLOCK = 1 << 20  # bytes read at a time from an upload
PURPOSES = ("batch",)  # what may be uploaded here


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def file_object(
    file_id: str, size: int, created_at: float, filename: str, purpose: str
) -> dict[str, Any]:
    """A File object as the OpenAI API returns it."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(created_at),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _clean_name(name: str | None) -> str:
    """The uploaded file's name for display only (it never becomes a path): its last part,
    without control characters, at most 255 characters."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())
    return base[:255] or "upload.jsonl"


class FileStore:
    """Uploaded batch files. media: the media root; max_bytes: the largest upload."""

    def __init__(self, media: Path, max_bytes: int) -> None:
        self.media = media
        self.folder = media / FILES_DIR
        self.max_bytes = max_bytes

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not UPLOAD_ID.match(file_id):
            raise not_found("File", file_id)
        return self.folder / f"{file_id}.jsonl", self.folder / f"{file_id}.json"

    def save(self, stream: BinaryIO, filename: str | None, purpose: str) -> dict[str, Any]:
        """Store an upload after checking it as a batch file; its File object.

        ApiError 400 for another purpose, a file over max_bytes, or a line that is not a valid
        batch request (the message names the line, as `gpujobs infer` does).
        """
        if purpose not in PURPOSES:
            raise ApiError(
                400,
                f"Invalid value for 'purpose': {purpose!r} is not supported here (only 'batch').",
                param="purpose",
            )
        file_id = new_file_id()
        self.folder.mkdir(parents=True, exist_ok=True)
        content, meta = self._paths(file_id)
        partial = self.folder / f".{file_id}.uploading"
        name = _clean_name(filename)
        try:
            size = 0
            with partial.open("wb") as handle:
                while block := stream.read(COPY_BLOCK):
                    size += len(block)
                    if size > self.max_bytes:
                        raise ApiError(
                            400,
                            f"File {name!r} is larger than {self.max_bytes} bytes, the most a "
                            "batch file may hold.",
                            param="file",
                        )
                    handle.write(block)
            try:
                BatchFile(partial, self.media).count()
            except InvalidSpec as exc:
                raise ApiError(
                    400, f"Invalid batch file {name!r}: {exc}", param="file",
                    code="invalid_batch_file",
                ) from None  # fmt: skip
            partial.replace(content)
        finally:
            partial.unlink(missing_ok=True)
        obj = file_object(file_id, size, time.time(), name, purpose)
        _write_json(meta, obj)
        return obj

    def get(self, file_id: str) -> dict[str, Any]:
        """The File object of an upload; ApiError 404 when there is none."""
        content, meta = self._paths(file_id)
        try:
            obj: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise not_found("File", file_id) from None
        if not content.is_file():
            raise not_found("File", file_id)
        return obj

    def content_path(self, file_id: str) -> Path:
        """Where an upload's bytes are; ApiError 404 when there is none."""
        self.get(file_id)
        return self._paths(file_id)[0]

    def delete(self, file_id: str) -> None:
        """Remove an upload (batches made from it keep their own copy of its requests)."""
        content, meta = self._paths(file_id)
        self.get(file_id)
        meta.unlink(missing_ok=True)
        content.unlink(missing_ok=True)

    def all(self) -> list[dict[str, Any]]:
        """Every upload's File object, in no particular order."""
        objects = []
        for meta in self.folder.glob("file-*.json") if self.folder.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                objects.append(json.loads(meta.read_text(encoding="utf-8")))
        return objects


def _write_json(path: Path, value: Any) -> None:
    """Write JSON under a temporary name, then rename: a reader never sees half of it."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.writing")
    try:
        temp.write_text(json.dumps(value), encoding="utf-8")
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
