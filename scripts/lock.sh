#!/usr/bin/env bash
# Refresh the lock, constraints.txt: resolve the newest releases that setup.cfg allows in a throwaway environment
# (torch: the lock's current pin, or TORCH_SPEC), run the fast suite there, and only if it passes write the
# environment's exact versions to constraints.txt (atomically). Any failure keeps the old lock.
# Run `bash scripts/drift.sh` first; commit the new lock together with the full suite passing on it
# (`bash scripts/test.sh`, which reinstalls .venv from the new lock).
#
#   EXTRAS   extras resolved into the lock (default: every extra in setup.cfg but llama_cpp, so optional installs
#            keep the locked versions; llama-cpp-python compiles llama.cpp for the machine, so it is not locked)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/fresh_env.sh"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-$("$PYTHON" - "$ROOT/setup.cfg" <<'PY'
import configparser, sys
c = configparser.ConfigParser()
c.read(sys.argv[1])
print(",".join(e for e in c["options.extras_require"] if e != "llama_cpp"))
PY
)}"
spec="${TORCH_SPEC:-$("$PYTHON" "$ROOT/scripts/deps.py" torch "$ROOT/constraints.txt" 2>/dev/null \
  || grep -E '^\s*torch\s*[<>=]' "$ROOT/setup.cfg" | head -1 | tr -d ' ')}"
dir="$(mktemp -d "${TMPDIR:-/tmp}/gpt2_accel-lock-XXXXXX")"
trap 'rm -rf "$dir"' EXIT
echo "[lock] resolving $spec + gpt2_accel[$EXTRAS] at the newest allowed releases in $dir/venv" >&2
fresh_env "$dir" newest "$spec" "$EXTRAS" || { echo "[lock] the ranges did not resolve; constraints.txt is unchanged" >&2; exit 1; }
echo "[lock] $(main_versions "$dir/venv"); running the fast suite" >&2
if ! summary="$(fast_suite "$dir/venv" "$dir/pytest.log")"; then
  echo "[lock] the fast suite failed on the new versions ($summary); constraints.txt is unchanged" >&2
  exit 1
fi
"$dir/venv/bin/python" -m pip freeze --exclude-editable > "$dir/freeze.txt"
"$PYTHON" "$ROOT/scripts/deps.py" write "$dir/freeze.txt" "$ROOT/constraints.txt" || exit 1
echo "[lock] fast suite: $summary"
echo "[lock] review with: git diff constraints.txt"
