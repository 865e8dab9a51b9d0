"""The CLI as a user runs it: a real `gpujobs` process per command.

Bad input gets one line on stderr, a non-zero exit code, no traceback, and nothing queued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from gpujobs import keys
from gpujobs.config import Settings
from tests.helpers import WorkerProcess


def gpujobs(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpujobs", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
        cwd=cwd, check=False,
    )  # fmt: skip


def assert_nothing_queued(broker_url: str) -> None:
    r = redis.Redis.from_url(broker_url)
    assert not r.keys(keys.job("*"))
    assert sum(r.llen(name) for name in keys.queue_lists("transcode")) == 0


@pytest.fixture
def video(media_clip: Callable[..., Path]) -> Path:
    return media_clip("v/clip.mp4", seconds=1, size="320x240")


BAD_PARAMETERS = [
    (["--width", "855"], "width: must be even"),
    (["--height", "0"], "height: must be a positive"),
    (["--height", "-480"], "height: must be a positive"),
    (["--preset", "p9"], "preset: Input should be 'p1'"),
    (["--cq", "60"], "cq: Input should be less than or equal to 51"),
    (["--codec", "vp9"], "codec: Input should be 'h264' or 'hevc'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_PARAMETERS)
def test_bad_parameters(
    settings: Settings, video: Path, broker_url: str, args: list[str], message: str
) -> None:
    result = gpujobs("submit", str(video), *args)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {message}") and "Traceback" not in result.stderr
    assert_nothing_queued(broker_url)


def test_bad_files(settings: Settings, video: Path, broker_url: str, tmp_path: Path) -> None:
    media = settings.media
    (media / "empty.mp4").write_bytes(b"")
    (media / "notes.mp4").write_text("these are not the frames you are looking for\n" * 10)
    (media / "adir.mp4").mkdir()
    dash = media / "-i.mp4"
    dash.write_bytes(video.read_bytes())
    escape = media / "\x1b[31mred.mp4"  # a name a terminal would act on
    undecodable = media / os.fsdecode(b"bad\xff\xfename.mp4")  # bytes that are not UTF-8
    for named in (escape, undecodable):
        named.write_bytes(video.read_bytes())
    (media / "v" / "clip.mkv").write_bytes(video.read_bytes())  # same stem, same default output
    (media / "alias.mp4").symlink_to(video)  # an output that is the input through a link
    (media / "away.mp4").symlink_to(tmp_path / "away.mp4")
    cases = [
        ([str(media / "missing.mp4")], "does not exist"),
        ([str(media / "empty.mp4")], "is empty"),
        ([str(media / "notes.mp4")], "is not a video file"),
        ([str(media / "adir.mp4")], "is a directory"),
        (["--", str(dash)], "must not start with '-'"),
        ([str(escape)], "input path contains a control character ('\\x1b')"),
        ([str(undecodable)], "input path is not valid UTF-8"),
        ([str(video), "-o", str(video)], "error: output must differ from the input"),
        ([str(video), "-o", str(tmp_path / "elsewhere.mp4")], "is outside the media root"),
        (
            [str(video), "-o", str(media / "alias.mp4"), "--overwrite"],
            f"is the input {video.relative_to(media)} (through a link)",
        ),
        (
            [str(video), "-o", str(media / "away.mp4"), "--overwrite"],
            "is a link that points outside the media root",
        ),
        ([str(video), "-o", str(media / "v" / ".." / "up.mp4")], "must not contain '..'"),
        ([str(video), str(media / "missing.mp4")], "does not exist"),  # one bad: none queued
        (
            [str(video), str(media / "v" / "clip.mkv")],
            "output v/clip.480p.mp4 is the output of both v/clip.mp4 and v/clip.mkv",
        ),
    ]
    for args, message in cases:
        result = gpujobs("submit", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, args
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args,
            result.stderr,
        )
        assert "Traceback" not in result.stdout + result.stderr
    assert_nothing_queued(broker_url)


def test_unreachable_broker_names_the_url(settings: Settings, video: Path) -> None:
    result = gpujobs("submit", str(video), env={"GPUJOBS_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach the broker at redis://127.0.0.1:1/0")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_job(settings: Settings) -> None:
    for command in (["status", "nope"], ["cancel", "nope"], ["watch", "nope"]):
        result = gpujobs(*command)
        assert result.returncode == 4
        assert result.stderr.strip() == (
            "error: no job 'nope' (never submitted, or its record expired)"
        )


def test_paths_are_shown_as_written_never_as_markup(settings: Settings, video: Path) -> None:
    # rich reads `[/b]` as a closing tag (MarkupError: every `ls` failed while such a job was
    # listed) and `[x]` as a style (hidden from the path shown).
    names = ["tags/x[/b].mp4", "tags/[bold]*?.mp4"]
    for name in names:
        (settings.media / name).parent.mkdir(parents=True, exist_ok=True)
        (settings.media / name).write_bytes(video.read_bytes())
    submitted = gpujobs("submit", *(str(settings.media / n) for n in names))
    assert submitted.returncode == 0, submitted.stderr
    ids = [line.split()[1] for line in submitted.stdout.splitlines()]
    listed = gpujobs("ls", env={"COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in names), listed.stdout
    for job_id, name in zip(ids, names, strict=True):
        detail = gpujobs("status", job_id, env={"COLUMNS": "200"})
        assert detail.returncode == 0 and name in detail.stdout, detail.stderr
    # The bars of --wait are drawn before the (here, absent) worker would run them.
    waited = gpujobs("watch", ids[0], "--timeout", "1")
    assert waited.returncode == 124 and "Traceback" not in waited.stderr, waited.stderr


def test_submit_wait_status_ls_json(
    settings: Settings,
    media_clip: Callable[..., Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    a = media_clip("a.mp4", seconds=1, size="320x240")
    b = media_clip("b.mp4", seconds=1, size="320x240")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(a.read_bytes())
    start_worker()
    result = gpujobs("submit", str(a), str(b), str(outside), "--height", "120", "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("succeeded") >= 3
    assert (settings.media / "a.120p.mp4").exists() and (settings.media / "b.120p.mp4").exists()
    # A file from outside the media root is copied into its inbox first.
    assert (settings.media / "inbox" / "outside.120p.mp4").exists()
    listed = gpujobs("ls", "--json")
    records = json.loads(listed.stdout)
    assert len(records) == 3 and all(r["state"] == "succeeded" for r in records)
    shown = gpujobs("status", records[0]["id"], "--json")
    assert json.loads(shown.stdout)["id"] == records[0]["id"]
    human = gpujobs("status", records[0]["id"])
    assert "succeeded" in human.stdout and "worker" in human.stdout
    table = gpujobs("ls", "--state", "succeeded")
    assert all(r["id"] in table.stdout for r in records)


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("GPUJOBS_LEASE_S", "abc", "error: GPUJOBS_LEASE_S: Input should be a valid number"),
    ("GPUJOBS_RECORD_TTL_S", "-5", "error: GPUJOBS_RECORD_TTL_S: Input should be greater than 0"),
    ("GPUJOBS_CONNECT_TIMEOUT_S", "nan", "error: GPUJOBS_CONNECT_TIMEOUT_S: Input should be a "
     "finite number"),
    ("GPUJOBS_DEFAULT_PRESET", "p9", "error: GPUJOBS_DEFAULT_PRESET: Input should be 'p1'"),
])  # fmt: skip
def test_a_bad_setting_is_one_line_naming_its_variable(
    settings: Settings, video: Path, variable: str, value: str, message: str
) -> None:
    for args in (["ls"], ["submit", str(video)], ["worker", "--check"]):
        result = gpujobs(*args, env={variable: value})
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_empty_setting_is_an_unset_one(tmp_path: Path) -> None:
    env = {"GPUJOBS_STATE_DIR": str(tmp_path), "GPUJOBS_MEDIA_ROOT": "", "GPUJOBS_API_KEY": ""}
    outside = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")}
    read = subprocess.run(
        [sys.executable, "-c", "from gpujobs.config import Settings; s = Settings(); "
         "print(s.media, s.api_key)"],
        capture_output=True, text=True, timeout=60, env={**outside, **env}, cwd=tmp_path,
        check=True,
    )  # fmt: skip
    assert read.stdout.split() == [str(tmp_path / "media"), "None"]
    assert Settings(api_key="", vllm_api_key="").api_key is None


def test_usage_errors_are_one_line_too(settings: Settings) -> None:
    cases = [
        (["submit"], "error: Missing argument 'FILE'."),
        (["submit", "x.mp4", "--height", "abc"], "error: Invalid value for '--height'"),
        (["submit", "x.mp4", "--bogus"], "error: No such option: --bogus"),
        (["nosuch"], "error: No such command 'nosuch'."),
        (["ls", "--limit", "0"], "error: Invalid value for '--limit'"),
        (["watch", "x", "--timeout", "nan"], "error: Invalid value for '--timeout': must be a"),
        (["submit", "x.mp4", "--wait", "--timeout", "-1"], "error: Invalid value for '--timeout'"),
        (["top", "--timeout", "inf"], "error: Invalid value for '--timeout': must be a finite"),
    ]
    for args, message in cases:
        result = gpujobs(*args)
        assert result.returncode == 2, args
        assert result.stderr.startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert gpujobs().returncode == 0  # no command: the help
