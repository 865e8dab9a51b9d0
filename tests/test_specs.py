"""TranscodeSpec validation: every bad parameter is refused with a message naming it."""

from __future__ import annotations

import random
from pathlib import PurePosixPath

import pytest
from pydantic import ValidationError

from gpujobs.paths import pure_posix
from gpujobs.specs import (
    JobKind,
    JobRecord,
    JobState,
    TranscodeSpec,
    check_media_path,
    compact_json,
    suffix,
)


def spec(**overrides: object) -> TranscodeSpec:
    values: dict[str, object] = {"input": "in/a.mp4", "output": "out/a.mp4", **overrides}
    return TranscodeSpec.model_validate(values)


def test_defaults_are_the_seed_command() -> None:
    s = spec()
    assert (s.height, s.codec, s.preset, s.cq, s.audio, s.threads) == (
        480,
        "h264",
        "p1",
        28,
        "copy",
        2,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 855}, "must be even"),
        ({"height": 0}, "positive"),
        ({"height": -480}, "positive"),
        ({"preset": "p9"}, "p1"),
        ({"cq": 60}, "less than or equal to 51"),
        ({"cq": -1}, "greater than or equal to 0"),
        ({"codec": "vp9"}, "h264"),
        ({"audio": "mp3"}, "copy"),
        ({"output": "in/a.mp4"}, "output must differ from the input"),
        ({"output": "../escape.mp4"}, "'..'"),
        ({"output": "/etc/passwd.mp4"}, "relative to the media root"),
        ({"input": "-i.mp4"}, "must not start with '-'"),
        ({"output": "out/a.txt"}, "must end in .mp4"),
        ({"priority": 10}, "less than or equal to 9"),
        ({"threads": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_parameters_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**overrides)


def test_record_round_trips_through_a_redis_hash() -> None:
    record = JobRecord(
        id="abc", kind=JobKind.TRANSCODE, state=JobState.RUNNING,
        spec=spec().model_dump(), percent=42.5, fps=120.0, created_at=1.5,
        result={"width": 854},
    )  # fmt: skip
    flat = record.to_hash()
    assert all(isinstance(v, str) for v in flat.values())
    assert "eta_s" not in flat  # None is not stored
    assert JobRecord.from_hash(flat) == record
    # Every field set, each written as pydantic's JSON mode writes it (to_hash skips pydantic).
    full = JobRecord(
        id="p-1", kind=JobKind.INFERENCE, state=JobState.FAILED, spec={"a": [1, 2.5, None]},
        percent=1e-07, fps=29.97, speed=1.0, eta_s=3.25, worker="w@h", node="n", gpu="GPU-1",
        encode_path="cpu", queue="q", attempt=3, error="é\nx", output="o.mp4",
        result={"k": {"n": 1}}, created_at=1796682995.820238, started_at=2.0, finished_at=3.0,
        updated_at=4.0, pieces=["p-1.0", "p-1.1"], parent="p",
    )  # fmt: skip
    assert set(full.to_hash()) == set(JobRecord.model_fields)
    assert full.to_hash() == {
        name: compact_json(value) if isinstance(value, dict | list) else str(value)
        for name, value in full.model_dump(mode="json").items()
    }
    assert JobRecord.from_hash(full.to_hash()) == full


def test_terminal_states() -> None:
    assert {s for s in JobState if s.terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
    }


def _pathlib_check(value: str) -> str:
    """What check_media_path answered when it parsed with PurePosixPath (before 2026-12-07)."""
    if not value or not value.strip():
        raise ValueError("empty")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError("absolute")
    if ".." in path.parts:
        raise ValueError("..")
    if path.name.startswith("-"):
        raise ValueError("-")
    return path.as_posix()


def test_media_paths_normalise_as_pathlib_does() -> None:
    # Written with str operations for speed: the same paths accepted, the same normal form,
    # the same extension, over tricky cases and 20,000 random ones.
    pieces = ["a", "b.mp4", "/", "//", ".", "..", "-x", ".mkv", " ", "é", "\\", "a.", ".hide"]
    rng = random.Random(7)
    cases = ["", ".", "./", "a//b/./c.mp4", "a/.", "./a", "-a/.", "a/-b.mp4", ".../x.ts", "a/.mp4"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(20_000)]
    for value in cases:
        try:
            expected: str | None = _pathlib_check(value)
        except ValueError:
            expected = None
        try:
            got: str | None = check_media_path(value, "input")
        except ValueError:
            got = None
        assert got == expected, value
        if got is not None:
            assert suffix(got) == PurePosixPath(got).suffix, value
        # How an input is named before it is found (absolute or relative, never refused).
        for named in (value, "/" + value, "//" + value, "///" + value):
            assert pure_posix(named) == str(PurePosixPath(named)), named
