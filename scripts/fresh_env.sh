#!/usr/bin/env bash
# Sourced by scripts/drift.sh and scripts/lock.sh: build a throwaway environment and run the fast suite in it.
#
# fresh_env DIR MODE TORCH_SPEC EXTRAS
#   MODE newest: every dependency at the newest release setup.cfg allows (uv, --upgrade);
#   MODE lowest: every direct dependency at its declared lower bound (uv --resolution lowest-direct).
#   torch is installed first with pip from TORCH_SPEC (pip reads this machine's find-links/index settings, which
#   is how a CPU build is picked), then held at that exact build while uv resolves the rest.
# fast_suite VENV LOG: run `pytest -m "not slow"` with VENV first on PATH; prints pytest's summary line.
# main_versions VENV: "torch==... transformers==..." of the main dependencies.

fresh_env() {
  local dir=$1 mode=$2 torch_spec=$3 extras=$4 venv="$1/venv" tv resolution=()
  "${PYTHON:-python3}" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install --quiet --upgrade pip uv 2>&1 | grep -v "is ignored: it is neither" >&2
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet $torch_spec 2>&1 | grep -v "is ignored: it is neither" >&2
  # the distribution's version (torch.__version__ can carry a build label the index does not, e.g. +cu130)
  tv="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')" || return 1
  echo "torch==$tv" > "$dir/torch.txt"
  [ "$mode" = lowest ] && resolution=(--resolution lowest-direct)
  [ "$mode" = newest ] && resolution=(--upgrade)
  "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" "${resolution[@]}" -c "$dir/torch.txt" \
    -e "$ROOT[$extras]"
}

fast_suite() {
  local venv=$1 log=$2 status
  # shellcheck disable=SC2086
  (cd "$ROOT" && export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" && timeout 3000 python -m pytest -m "not slow" \
     -q -p no:cacheprovider ${PYTEST_ARGS:-} > "$log" 2>&1)
  status=$?
  grep -E '(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs  # pytest -q's last line
  [ $status -ne 0 ] && grep -E '^(FAILED|ERROR) ' "$log" | head -20 >&2
  return $status
}

main_versions() {
  "$1/bin/python" - <<'PY'
import importlib.metadata as m
names = "torch transformers accelerate datasets deepspeed huggingface_hub tokenizers safetensors numpy".split()
found = []
for n in names:
    try:
        found.append(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError:
        pass
print(" ".join(found))
PY
}
