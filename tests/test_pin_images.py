"""scripts/pin_images.py against a real HTTP registry: the OCI distribution API's manifest HEAD,
behind the anonymous bearer-token challenge Docker Hub and nvcr.io use.

The registry here serves the repositories of the images in k8s/ with made-up digests; the
script runs as a process, on a copy of k8s/, first with --dry-run (nothing written), then for real.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pin_images.py"
TOKEN = "t0ken"


def digest_of(repository: str, tag: str) -> str:
    return "sha256:" + hashlib.sha256(f"{repository}:{tag}".encode()).hexdigest()


class Registry(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # the token endpoint
        if self.path.startswith("/token?"):
            body = json.dumps({"token": TOKEN}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_HEAD(self) -> None:  # /v2/<repository>/manifests/<tag>
        match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
        if not match:
            self.send_error(404)
            return
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            host = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
            self.send_response(401)
            self.send_header(
                "WWW-Authenticate",
                f'Bearer realm="{host}/token",service="test",scope="repository:{match[1]}:pull"',
            )
            self.end_headers()
            return
        assert "application/vnd.oci.image.index.v1+json" in self.headers.get("Accept", "")
        self.send_response(200)
        self.send_header("Docker-Content-Digest", digest_of(match[1], match[2]))
        self.end_headers()


@pytest.fixture
def registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def image_lines(root: Path) -> dict[str, list[str]]:
    return {
        str(p.relative_to(root)): re.findall(r"image:\s*(\S+)", p.read_text())
        for p in sorted(root.rglob("*.yaml"))
    }


def test_dry_run_writes_nothing_then_every_third_party_image_is_pinned(
    registry: str, tmp_path: Path
) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", root)
    before = {p: p.read_text() for p in root.rglob("*.yaml")}
    registries = ["--registry", f"docker.io={registry}", "--registry", f"nvcr.io={registry}"]

    dry = run("--root", str(root), "--dry-run", *registries)
    assert dry.returncode == 0, dry.stderr
    expected = {
        "vllm/vllm-openai:v0.11.1": digest_of("vllm/vllm-openai", "v0.11.1"),
        "valkey/valkey:8.1.3": digest_of("valkey/valkey", "8.1.3"),
        "nvcr.io/nvidia/k8s-device-plugin:v0.17.1": digest_of(
            "nvidia/k8s-device-plugin", "v0.17.1"
        ),
    }
    for name, digest in expected.items():
        assert f"-> {name}@{digest}" in dry.stdout, dry.stdout
    assert all(line.startswith("would pin ") for line in dry.stdout.splitlines())
    assert {p: p.read_text() for p in root.rglob("*.yaml")} == before  # nothing written

    real = run("--root", str(root), *registries)
    assert real.returncode == 0, real.stderr
    for refs in image_lines(root).values():
        for ref in refs:
            name = ref.split("@")[0]
            if "gpujobs-worker" in name:
                assert "@" not in ref  # ours: built, not pulled
            else:
                assert ref == f"{name}@{expected[name]}"
    # Only the image lines changed: comments and layout are as they were.
    for path, text in before.items():
        old = [line for line in text.splitlines() if "image:" not in line]
        assert [line for line in path.read_text().splitlines() if "image:" not in line] == old
    again = run("--root", str(root), *registries)
    assert again.returncode == 0 and "every image is pinned" in again.stdout


def test_an_unreachable_registry_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", root)
    before = {p: p.read_text() for p in root.rglob("*.yaml")}
    dead = "http://127.0.0.1:9"  # discard: nothing listens
    result = run("--root", str(root), "--registry", f"docker.io={dead}",
                 "--registry", f"nvcr.io={dead}")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "cannot reach" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert {p: p.read_text() for p in root.rglob("*.yaml")} == before
    bad = run("--root", str(root), "--registry", "docker.io")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --registry docker.io")
