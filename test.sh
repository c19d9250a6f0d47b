#!/usr/bin/env bash
# Runs the test suite on a CPU, on every core (pytest-xdist): creates or reuses .venv at the repo root, installs the pinned
# requirements into it, then runs pytest. Extra arguments go to pytest (./test.sh -k kv_cache).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
python -m pip install -q -r requirements-test.txt
exec python -m pytest -q -n auto --dist worksteal "$@"
