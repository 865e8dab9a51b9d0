"""Pin every third-party image under k8s/ to the digest its tag points at now.

Each `image: NAME:TAG` or `image: NAME:TAG@sha256:...` line of k8s/**/*.yaml is looked up in its
registry (the OCI distribution API: a HEAD of /v2/REPO/manifests/TAG, with the anonymous bearer
token the registry asks for, as Docker Hub and nvcr.io do) and rewritten as `NAME:TAG@DIGEST`,
the digest of the multi-arch index where there is one. The tag stays for people to read; the
runtime pulls by the digest. Lines are edited in place, comments and layout untouched. Our own
image (gpujobs-worker) is built by you and skipped.

    .venv/bin/python scripts/pin_images.py [--dry-run] [--root k8s]
        [--registry docker.io=http://127.0.0.1:5000]   # another address for a registry

--dry-run prints what would change and writes nothing. Needs the registries to be reachable
(not the case on a machine without the internet: it then stops with one line saying which).
Exit status: 0 done (or nothing to change), 1 a registry failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("gpujobs-worker",)  # built here, not pulled: pin it in your overlay once pushed
IMAGE_LINE = re.compile(r"^(?P<lead>\s*-?\s*image:\s*)(?P<ref>[^\s#]+)(?P<rest>.*)$")
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
DOCKER_HUB = "registry-1.docker.io"


class PinError(Exception):
    """One line: which image, which registry, what went wrong."""


@dataclass(frozen=True)
class ImageRef:
    """`registry/repository:tag@digest`, split; registry is the host to ask."""

    name: str  # as written, without tag and digest
    registry: str
    repository: str
    tag: str
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        name, _, digest = ref.partition("@")
        slash, colon = name.rfind("/"), name.rfind(":")
        if colon <= slash:
            raise PinError(f"{ref}: no tag to resolve (write NAME:TAG)")
        name, tag = name[:colon], name[colon + 1 :]
        first, _, remainder = name.partition("/")
        if remainder and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, remainder
        else:
            registry, repository = "docker.io", name if "/" in name else f"library/{name}"
        return cls(name, registry, repository, tag, digest or None)

    def pinned(self, digest: str) -> str:
        return f"{self.name}:{self.tag}@{digest}"


def bearer_token(client: httpx.Client, challenge: str, ref: ImageRef) -> str:
    """The anonymous token a `WWW-Authenticate: Bearer realm=...,service=...` challenge offers."""
    scheme, _, params = challenge.partition(" ")
    if scheme.lower() != "bearer":
        raise PinError(f"{ref.registry}: asks for {scheme} auth, not an anonymous bearer token")
    fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
    if "realm" not in fields:
        raise PinError(f"{ref.registry}: bearer challenge without a realm")
    query = {"scope": fields.get("scope", f"repository:{ref.repository}:pull")}
    if "service" in fields:
        query["service"] = fields["service"]
    response = client.get(fields["realm"], params=query)
    if response.status_code != 200:
        raise PinError(f"{ref.registry}: token endpoint answered HTTP {response.status_code}")
    body = response.json()
    token = body.get("token") or body.get("access_token")
    if not token:
        raise PinError(f"{ref.registry}: token endpoint gave no token")
    return str(token)


def resolve(client: httpx.Client, ref: ImageRef, registries: dict[str, str]) -> str:
    """The digest ref's tag points at now (sha256:...)."""
    host = DOCKER_HUB if ref.registry == "docker.io" else ref.registry
    base = registries.get(ref.registry, f"https://{host}")
    url = f"{base}/v2/{ref.repository}/manifests/{ref.tag}"
    headers = {"Accept": ACCEPT}
    try:
        response = client.head(url, headers=headers)
        if response.status_code == 401:
            challenge = response.headers.get("www-authenticate", "")
            headers["Authorization"] = f"Bearer {bearer_token(client, challenge, ref)}"
            response = client.head(url, headers=headers)
    except httpx.HTTPError as exc:
        raise PinError(f"{ref.name}:{ref.tag}: cannot reach {base}: {exc}") from None
    if response.status_code != 200:
        raise PinError(f"{ref.name}:{ref.tag}: {base} answered HTTP {response.status_code}")
    digest = response.headers.get("docker-content-digest", "")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PinError(f"{ref.name}:{ref.tag}: {base} sent no sha256 digest")
    return digest


def pin(root: Path, registries: dict[str, str], dry_run: bool) -> list[str]:
    """Rewrite the image lines under root; the changes as `file: old -> new` lines."""
    changes: list[str] = []
    resolved: dict[str, str] = {}
    edited: dict[Path, list[str]] = {}  # written only once every image is resolved
    with httpx.Client(timeout=30, follow_redirects=True) as client:
        for path in sorted(root.rglob("*.yaml")):
            lines = path.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                match = IMAGE_LINE.match(line.rstrip("\n"))
                if not match:
                    continue
                ref = ImageRef.parse(match["ref"])
                if ref.name.rsplit("/", 1)[-1] in SKIP:
                    continue
                key = f"{ref.name}:{ref.tag}"
                if key not in resolved:
                    resolved[key] = resolve(client, ref, registries)
                new = ref.pinned(resolved[key])
                if new != match["ref"]:
                    changes.append(f"{path.relative_to(root)}: {match['ref']} -> {new}")
                    lines[i] = f"{match['lead']}{new}{match['rest']}\n"
                    edited[path] = lines
    if not dry_run:
        for path, lines in edited.items():
            path.write_text("".join(lines))
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    parser.add_argument("--root", type=Path, default=ROOT / "k8s", help="folder of manifests")
    parser.add_argument(
        "--registry",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="reach registry NAME (docker.io, nvcr.io) at URL instead",
    )
    args = parser.parse_args(argv)
    registries = {}
    for item in args.registry:
        name, sep, url = item.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            print(f"error: --registry {item}: write NAME=http(s)://HOST[:PORT]", file=sys.stderr)
            return 2
        registries[name] = url.rstrip("/")
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    try:
        changes = pin(args.root, registries, args.dry_run)
    except PinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for change in changes:
        print(("would pin " if args.dry_run else "pinned ") + change)
    if not changes:
        print("every image is pinned to the digest its tag points at")
    return 0


if __name__ == "__main__":
    sys.exit(main())
