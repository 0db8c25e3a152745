#!/usr/bin/env bash
# The drift check: the fast suite (-m "not slow") against the NEWEST releases that setup.cfg allows and against
# the declared LOWER BOUNDS, each in its own throwaway environment (deleted afterwards). Run it before refreshing
# the lock (scripts/lock.sh). It never touches .venv or constraints.txt, and CI does not run it, so an upstream
# release cannot block a landing.
#
#   bash scripts/drift.sh                 both environments
#   bash scripts/drift.sh newest          one of them (newest | lowest)
#   EXTRAS=dev,deepspeed                  extras to install (default: the same as scripts/setup_env.sh)
#   TORCH_SPEC=...                        torch for the environment (default: newest: the newest release setup.cfg
#                                         allows, on PyPI a multi-GB CUDA build that runs the suite on CPU too;
#                                         lowest: setup.cfg's lower bound)
#   PYTEST_ARGS="-x -k model"             extra pytest arguments
#
# Prints one line per environment, "drift <env>: <pytest summary> | <main dependency versions>"; exit 1 if any
# environment fails to install or to pass.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/fresh_env.sh"
EXTRAS="${EXTRAS:-dev,deepspeed,tensorboard,peft,gguf,onnx,lm_eval}"
range="$(grep -E '^\s*torch\s*[<>=]' "$ROOT/setup.cfg" | head -1 | tr -d ' ')"  # e.g. torch>=2.13,<2.15
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(newest lowest)
rc=0
for mode in "${modes[@]}"; do
  case "$mode" in
    newest) spec="${TORCH_SPEC:-$range}" ;;
    lowest) spec="${TORCH_SPEC:-torch==$(echo "$range" | sed -E 's/.*>=([0-9.]+).*/\1/')}" ;;
    *) echo "unknown environment '$mode': use newest or lowest" >&2; exit 2 ;;
  esac
  dir="$(mktemp -d "${TMPDIR:-/tmp}/gpt2_accel-drift-$mode-XXXXXX")"
  echo "[drift] $mode: building $dir/venv ($spec, then gpt2_accel[$EXTRAS])" >&2
  if ! fresh_env "$dir" "$mode" "$spec" "$EXTRAS"; then
    echo "drift $mode: the environment did not install (see above)"
    rc=1
  else
    versions="$(main_versions "$dir/venv")"
    echo "[drift] $mode: $versions; running the fast suite" >&2
    summary="$(fast_suite "$dir/venv" "$dir/pytest.log")" || rc=1
    echo "drift $mode: ${summary:-no pytest summary, see the failures above} | $versions"
  fi
  rm -rf "$dir"
done
exit $rc
