#!/usr/bin/env bash
# Install gpujobs with its dev extra into .venv, lint, type-check and run the whole test suite.
# The README and CI (.ci/run) both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
