#!/usr/bin/env bash
# The whole test suite: set up .venv (once), check lint/format, run pytest (slow tests included).
# Extra arguments go to pytest: scripts/test.sh -m "not slow" -x
# The tests run in PYTEST_WORKERS processes (pytest-xdist; default 2, what CI's 2 cores sustain; 0: in this one
# process): most tests and launches use one core, so two at a time keep both cores busy. A later `-n N` wins.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
ruff check .
ruff format --check .
workers=()
if python -c "import xdist" 2>/dev/null; then
  workers=(-n "${PYTEST_WORKERS:-2}")
fi
python -m pytest "${workers[@]}" "$@"
