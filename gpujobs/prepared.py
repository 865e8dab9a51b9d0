"""A transcode checked and ready to queue (`PreparedJob`): its spec, the fingerprint that makes
two submits the same job, the file to copy into the media root first; and the check across the
jobs of one submit (`check_outputs`). Made by `Client.prepare_transcode`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from gpujobs.errors import InvalidSpec
from gpujobs.specs import JobKind, TranscodeSpec


@dataclass(frozen=True)
class PreparedJob:
    """A checked spec, and the file to copy into the media root before it is queued."""

    spec: TranscodeSpec
    fingerprint: str
    copy_from: Path | None = None


def check_outputs(prepared: Sequence[PreparedJob]) -> None:
    """InvalidSpec when two different jobs of one submit would write one output (the second
    would fail, or with --overwrite replace the first's): "output X is the output of both A
    and B". The same job twice (same input and settings) is one job, queued once."""
    writers: dict[str, PreparedJob] = {}
    for job in prepared:
        first = writers.setdefault(job.spec.output, job)
        if first.fingerprint != job.fingerprint:
            raise InvalidSpec(
                f"output {job.spec.output} is the output of both {first.spec.input} and "
                f"{job.spec.input} (give each its own output)"
            )


def fingerprint(spec: TranscodeSpec, source: Path) -> str:
    """What makes two submits the same job: the spec (but its priority) and the input file's
    size and modification time."""
    return stat_fingerprint(spec, source.stat())


def stat_fingerprint(spec: TranscodeSpec, info: os.stat_result) -> str:
    """`fingerprint` from the input's stat already taken (a bulk submit stats each input once)."""
    identity = {
        "kind": JobKind.TRANSCODE.value,
        "spec": spec.model_dump(mode="json", exclude={"priority"}),
        "input": [info.st_size, info.st_mtime_ns],
    }
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def make_spec(values: dict[str, Any]) -> TranscodeSpec:
    """A TranscodeSpec from `values`; InvalidSpec (one line) when they do not validate."""
    try:
        return TranscodeSpec.model_validate(values)
    except ValidationError as exc:
        raise InvalidSpec.from_validation(exc) from None
