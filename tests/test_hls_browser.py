"""An HLS ladder (made in one piece, and made as a split ladder by two workers) played in a real
browser: Debian's headless Chromium loads a page with hls.js
(the npm package, fetched with `npm pack`) over a local HTTP server, plays past two segment
boundaries, switches rendition when told to, and logs no error.

UPDATE_SCREENSHOTS=1 copies the screenshot to docs/ladder-hls-chromium.png."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpujobs.client import Client
from gpujobs.ladder import LadderSpec, submit_ladder
from gpujobs.media import StreamInfo
from gpujobs.specs import JobState
from tests.helpers import WorkerProcess
from tests.test_ladder import gop_clip
from workers.transcode import ladder
from workers.transcode.split import read_facts

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
HLS_JS = "hls.js@1"  # the npm package; its dist/hls.min.js is what the page loads
SEGMENT_S = 2.0

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gpujobs ladder</title>
<link rel="icon" href="data:,"></head>
<body style="margin:0;background:#111;color:#eee;font:14px sans-serif">
<video id="v" muted playsinline width="640" height="360"></video>
<pre id="status"></pre>
<script src="hls.min.js"></script>
<script>
  window.events = {errors: [], switched: [], levels: []};
  const video = document.getElementById("v");
  const hls = new Hls({startLevel: 0, capLevelToPlayerSize: false});
  hls.on(Hls.Events.ERROR, (_, d) => window.events.errors.push(`${d.type}/${d.details}`));
  hls.on(Hls.Events.LEVEL_SWITCHED, (_, d) => window.events.switched.push(d.level));
  hls.on(Hls.Events.MANIFEST_PARSED, (_, d) => {
    window.events.levels = d.levels.map((l) => `${l.width}x${l.height}@${l.bitrate}`);
    video.play();
  });
  hls.loadSource("ladder/master.m3u8");
  hls.attachMedia(video);
  window.hls = hls;
  setInterval(() => {
    const level = hls.levels[hls.currentLevel];
    document.getElementById("status").textContent =
      `t=${video.currentTime.toFixed(2)} s  rendition ${level ? level.height + "p" : "?"}` +
      `  levels ${window.events.levels.join(", ")}  errors ${window.events.errors.length}`;
  }, 100);
</script></body></html>
"""


@pytest.fixture(scope="session")
def hls_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hls.min.js from the npm registry (`npm pack`); the test skips, saying why, without npm
    or without the registry."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is absent (apt-get install npm) to fetch hls.js")
    folder = tmp_path_factory.mktemp("hlsjs")
    packed = subprocess.run(
        [npm, "pack", HLS_JS, "--pack-destination", str(folder), "--silent"],
        capture_output=True, text=True, timeout=180, check=False, cwd=folder,
    )  # fmt: skip
    tarballs = list(folder.glob("hls.js-*.tgz"))
    if packed.returncode != 0 or not tarballs:
        pytest.skip(f"npm pack {HLS_JS} failed: {packed.stderr.strip()[-200:]}")
    with tarfile.open(tarballs[0]) as tar:
        member = tar.getmember("package/dist/hls.min.js")
        source = tar.extractfile(member)
        assert source is not None
        target = folder / "hls.min.js"
        target.write_bytes(source.read())
    return target


@pytest.fixture
def one_ladder(tmp_path: Path, ffmpeg: str) -> Path:
    """A 360p+240p HLS ladder of a 10 s clip, 2 s segments, made by the worker's ladder command
    and checked."""
    source = gop_clip(ffmpeg, tmp_path / "talk.mp4", 10, "640x360")
    spec = LadderSpec(input="talk.mp4", output="ladder", renditions=[360, 240], segment_s=SEGMENT_S)
    video = StreamInfo(index=0, kind="video", kind_index=0, codec="h264", width=640, height=360)
    rungs = ladder.plan_renditions(spec.renditions, video)
    folder = tmp_path / "ladder"
    folder.mkdir()
    command = ladder.build_command(ffmpeg, spec, ladder.EncodePath.CPU, str(source), folder,
                                   rungs, 30.0, has_audio=True, video=video)  # fmt: skip
    subprocess.run([*command[:1], "-loglevel", "error", *command[1:]], check=True, timeout=120)
    ladder.check_ladder(folder, spec, rungs, read_facts(source))
    return folder


@pytest.fixture
def split_ladder(client: Client, ffmpeg: str, start_worker: Callable[..., WorkerProcess]) -> Path:
    """The same ladder made by two workers as a split ladder (a piece each, then packaged)."""
    source = gop_clip(ffmpeg, client.settings.media / "talk.mp4", 10, "640x360")
    start_worker("--hostname", "a@test")
    start_worker("--hostname", "b@test")
    job = submit_ladder(source, renditions=[360, 240], segment_s=SEGMENT_S, split=2, client=client)
    final = job.wait(timeout=200)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.pieces is not None and len(final.pieces) == 2
    return client.settings.media / "talk.hls"


@pytest.fixture(params=["one_ladder", "split_ladder"])
def site(request: pytest.FixtureRequest, tmp_path: Path, hls_js: Path) -> Iterator[str]:
    """A local HTTP server over: index.html, hls.min.js and ladder/ (the ladder under test)."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text(PAGE)
    shutil.copyfile(hls_js, root / "hls.min.js")
    shutil.copytree(request.getfixturevalue(request.param), root / "ladder")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {  # noqa: RUF012 - the stdlib's own class attribute
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".m3u8": "application/vnd.apple.mpegurl",
        ".m4s": "video/iso.segment",
        ".mp4": "video/mp4",
        ".js": "text/javascript",
    }

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)",
)
def test_chromium_plays_the_ladder_switches_rendition_and_logs_no_error(
    site: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "ladder-hls-chromium.png"
    split_made = "split_ladder" in request.node.callspec.id
    console_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
            ],
            viewport={"width": 900, "height": 420},
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else 0)
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            page.on("response", lambda r: console_errors.append(r.url) if r.status >= 400 else 0)
            response = page.goto(site)
            assert response is not None and response.status == 200
            # Past two segment boundaries (2 s and 4 s) on the first rendition.
            page.wait_for_function(
                f"document.getElementById('v').currentTime > {2 * SEGMENT_S + 0.5}",
                timeout=90_000,
            )
            levels = page.evaluate("window.events.levels")
            # hls.js orders the levels by bitrate: 240p first.
            assert [level.split("@")[0] for level in levels] == ["426x240", "640x360"], levels
            now = page.evaluate("hls.currentLevel")
            other = 1 - now
            page.evaluate(f"hls.currentLevel = {other}")  # told to switch
            page.wait_for_function(f"window.events.switched.includes({other})", timeout=60_000)
            at_switch = page.evaluate("document.getElementById('v').currentTime")
            page.wait_for_function(
                f"document.getElementById('v').currentTime > {at_switch + 1.5}", timeout=60_000
            )
            assert page.evaluate("hls.currentLevel") == other
            events = page.evaluate("window.events")
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert events["errors"] == [], events["errors"]
    assert console_errors == [], console_errors
    assert shot.stat().st_size > 5_000
    if os.environ.get("UPDATE_SCREENSHOTS") and not split_made:
        shutil.copyfile(shot, DOCS / "ladder-hls-chromium.png")
