#!/usr/bin/env bash
# The whole test suite: set up .venv (once), check lint/format, run pytest (slow tests included).
# Extra arguments go to pytest: scripts/test.sh -m "not slow" -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
ruff check .
ruff format --check .
python -m pytest "$@"
