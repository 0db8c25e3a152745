#!/usr/bin/env bash
# Creates ./.venv and installs gpt2_accel into it (editable), once. Sourced by scripts/demo.sh and scripts/test.sh.
# A second run installs nothing unless setup.cfg/pyproject.toml/TORCH_SPEC/EXTRAS changed.
#
#   TORCH_SPEC   the torch requirement to install first (default: torch==2.13.0, the CPU build used here).
#                GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" or any spec.
#   EXTRAS       extras of gpt2_accel to install (default: dev,deepspeed,tensorboard).
#   PYTHON       interpreter used to create the venv (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev,deepspeed,tensorboard}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) torch=[$TORCH_SPEC] extras=[$EXTRAS]"
stamp="$VENV/.gpt2_accel-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import gpt2_accel, torch" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
else
  echo "[setup] installing $TORCH_SPEC, then gpt2_accel[$EXTRAS] (editable)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build on machines without a local wheel.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
