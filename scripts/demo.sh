#!/usr/bin/env bash
# Install gpujobs (producer + worker) into .venv and transcode a generated 1080p clip with audio
# on the embedded default: a local Valkey and one worker, no Redis and no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet '.[worker]'
.venv/bin/gpujobs demo "$@"
