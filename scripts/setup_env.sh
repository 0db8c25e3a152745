#!/usr/bin/env bash
# Creates ./.venv and installs gpt2_accel into it (editable) at the exact versions of the lock, constraints.txt.
# Sourced by scripts/demo.sh and scripts/test.sh. A second run installs nothing unless the lock, setup.cfg,
# pyproject.toml, TORCH_SPEC, EXTRAS or LOCK changed.
#
#   TORCH_SPEC   the torch requirement installed first (default: the lock's torch pin, e.g. torch==2.13.0, which
#                is the CPU build where a CPU wheel is offered). GPU users:
#                TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   EXTRAS       extras of gpt2_accel to install (default: dev,deepspeed,tensorboard,peft,gguf,onnx,lm_eval:
#                everything the test suite exercises; llama_cpp is installed by the next step instead).
#   LLAMA_CPP    1 (default): install llama-cpp-python for the slow llama.cpp tests from a wheel cache outside the
#                clone, compiling it once (scripts/llama_cpp_wheel.sh: cache, seeding, timeout); 0: skip it.
#   DEEPSPEED_OPS 1 (default): install deepspeed as a wheel with its CPU ops (shared-memory all-reduce, cpu_adam)
#                compiled in, from a wheel cache outside the clone, compiling it once (scripts/deepspeed_wheel.sh);
#                0: the PyPI build, whose ops DeepSpeed compiles just in time in every fresh clone (~3 min).
#   LOCK         1 (default): install the lock's versions; 0: resolve the ranges in setup.cfg instead (newest).
#   PYTHON       interpreter used to create the venv (default: python3).
#   VENV         where the environment lives (default: ./.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-dev,deepspeed,tensorboard,peft,gguf,onnx,lm_eval}"
LOCK="${LOCK:-1}"
PYTHON="${PYTHON:-python3}"
LOCKFILE="$ROOT/constraints.txt"

# A damaged lock is an error before anything is installed (deps.py names the line and the fix).
"$PYTHON" "$ROOT/scripts/deps.py" check "$LOCKFILE" >/dev/null
TORCH_SPEC="${TORCH_SPEC:-$("$PYTHON" "$ROOT/scripts/deps.py" torch "$LOCKFILE")}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$LOCKFILE" | sha256sum | cut -c1-16) torch=[$TORCH_SPEC] extras=[$EXTRAS] lock=[$LOCK]"
stamp="$VENV/.gpt2_accel-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import gpt2_accel, torch" 2>/dev/null; then
  echo "[setup] environment up to date ($VENV)"
else
  # torch is not taken from the lock: TORCH_SPEC picks the build (CPU here, a CUDA index on GPUs).
  constraints=()
  if [ "$LOCK" = "1" ]; then
    grep -v -i -E '^(torch|torchvision|torchaudio|triton)==' "$LOCKFILE" > "$VENV/.constraints.txt"
    constraints=(-c "$VENV/.constraints.txt")
    echo "[setup] installing $TORCH_SPEC, then gpt2_accel[$EXTRAS] (editable) at the versions of constraints.txt"
  else
    echo "[setup] installing $TORCH_SPEC, then gpt2_accel[$EXTRAS] (editable) from the ranges in setup.cfg (LOCK=0)"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build on machines without a local wheel.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
  # A cached deepspeed wheel with prebuilt ops (same version as the lock's) replaces building PyPI's sdist.
  ds_wheel=()
  if [ "${DEEPSPEED_OPS:-1}" = 1 ] && [ "$LOCK" = 1 ] && [[ ",$EXTRAS," == *,deepspeed,* ]]; then
    # shellcheck source=scripts/deepspeed_wheel.sh
    source "$ROOT/scripts/deepspeed_wheel.sh"
    deepspeed_ops_cached_wheel "$(grep -i '^deepspeed==' "$LOCKFILE" | cut -d= -f3)"
    [ -n "$_ds_wheel" ] && ds_wheel=("$_ds_wheel") && echo "[setup] deepspeed from the wheel cache ($_ds_wheel)"
  fi
  "$VENV/bin/python" -m pip install --quiet "${constraints[@]}" -e "$ROOT[$EXTRAS]" "${ds_wheel[@]}"
  [ ${#ds_wheel[@]} = 1 ] && deepspeed_ops_mark
  echo "$want" > "$stamp"
fi
if [ "${DEEPSPEED_OPS:-1}" = 1 ]; then
  # Builds the wheel when the cache has none yet, or swaps it into an environment installed before.
  # shellcheck source=scripts/deepspeed_wheel.sh
  source "$ROOT/scripts/deepspeed_wheel.sh"
  deepspeed_ops_install
fi
if [ "${LLAMA_CPP:-1}" = 1 ]; then
  # shellcheck source=scripts/llama_cpp_wheel.sh
  source "$ROOT/scripts/llama_cpp_wheel.sh"
  llama_cpp_install
fi
export PATH="$VENV/bin:$PATH"
