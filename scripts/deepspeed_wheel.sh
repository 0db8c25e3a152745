#!/usr/bin/env bash
# Installs DeepSpeed into $VENV as a wheel with its two CPU ops compiled in (the shared-memory all-reduce,
# ShareMemCommBuilder, and ZeRO-Offload's DeepSpeedCPUAdam, CPUAdamBuilder), from a wheel cache outside the clone.
# Without it DeepSpeed compiles both just in time into ~/.cache/torch_extensions, and torch's key for that build
# includes the absolute paths of the sources and include directories, which lie inside the clone's own .venv: every
# fresh clone (every CI run) compiled them again, ~3 min of the suite (tests/conftest.py's deepspeed_ops fixture).
# The wheel is the same release as the lock's (constraints.txt is unchanged; only the compiled ops are added), built
# once per DeepSpeed version, Python, platform, torch version and CPU/compiler (the ops are built with -march=native).
# Sourced by scripts/setup_env.sh (DEEPSPEED_OPS=1, the default); also runs alone: bash scripts/deepspeed_wheel.sh
#
#   DEEPSPEED_WHEELS          the cache (default: ${XDG_CACHE_HOME:-~/.cache}/gpt2_accel/wheels, beside llama.cpp's)
#   DEEPSPEED_SEED            copies of a wheel cache (e.g. a CI cache restore of another machine's): a wheel found
#                             there under this cache key (a directory named like the cache's, so the same DeepSpeed,
#                             Python, torch and CPU) is copied into the cache
#   DEEPSPEED_BUILD_TIMEOUT   seconds the build may take (default 1800; ~3-6 min on 2 cores)
#   DEEPSPEED_REBUILD=1       retry a build that failed before
#
# The build is DeepSpeed's documented ahead-of-time install (https://www.deepspeed.ai/tutorials/advanced-install/):
# DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 (the BUILD_VARs of those two builders in DeepSpeed 0.19.8's
# op_builder/cpu/), with torch importable, hence `pip wheel --no-build-isolation` in $VENV. DeepSpeed then imports
# the compiled modules instead of compiling (OpBuilder.load checks git_version_info_installed.installed_ops).
# A failed or timed-out build never fails the set-up: it prints why, keeps the log next to the cache, leaves the
# PyPI build installed (the ops are then compiled just in time, as before), and is not retried until
# DEEPSPEED_REBUILD=1. Why our own cache and not pip's: see scripts/llama_cpp_wheel.sh (same reasons).

# The ops to compile in: DeepSpeed's build variables, also part of the cache key.
_DEEPSPEED_OPS_FLAGS="DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu"

# Sets _ds_version, _ds_key (the cache directory's name), _ds_dir, _ds_have (1 when the installed deepspeed has both ops compiled
# in) and _ds_why (why no wheel applies, else empty) for DeepSpeed $1 (default: the installed version).
_deepspeed_ops_key() {
  local py=${VENV:?VENV is not set}/bin/python cache=${DEEPSPEED_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/gpt2_accel/wheels}
  local version=$1 installed pytag plat torch kind cpu
  _ds_version="" _ds_key="" _ds_dir="" _ds_have=0 _ds_why=""
  read -r installed pytag plat torch kind _ds_have < <("$py" - <<'EOF' 2>/dev/null
import ast, importlib.metadata as m, sys, sysconfig
import torch
try:
    ds = m.version("deepspeed")
    # setup.py records the compiled-in ops here; reading it avoids importing deepspeed (seconds, and a warning)
    text = m.distribution("deepspeed").locate_file("deepspeed/git_version_info_installed.py").read_text()
    info = {t.id: ast.literal_eval(n.value) for n in ast.parse(text).body if isinstance(n, ast.Assign) for t in n.targets}
    have = int(all(info.get("installed_ops", {}).get(op) for op in ("cpu_adam", "deepspeed_shm_comm")))
except (m.PackageNotFoundError, OSError, ValueError, SyntaxError):
    ds, have = "-", 0
kind = "cpu" if torch.version.cuda is None and getattr(torch.version, "hip", None) is None else "gpu"
tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
print(ds, f"cp{sys.version_info[0]}{sys.version_info[1]}", tag, torch.__version__.replace("+", "_"), kind, have)
EOF
  ) || true  # no output (torch missing): _ds_why says so below
  version=${version:-$installed}
  _ds_version=$version
  if [ -z "$pytag" ]; then
    _ds_why="torch is not importable in $VENV"
  elif [ "$kind" != cpu ]; then
    _ds_why="torch is a CUDA/ROCm build (the prebuilt-ops wheel is for CPU torch; DeepSpeed builds its GPU ops itself)"
  elif [ -z "$version" ] || [ "$version" = - ]; then
    _ds_why="deepspeed is not installed"
  fi
  [ -n "$_ds_why" ] && return 0
  # -march=native: the ops are compiled for this CPU, so its target flags (as the compiler expands them) and the
  # compiler's version belong to the key; a wheel from another CPU is never picked up.
  cpu="$(${CXX:-c++} -march=native -Q --help=target 2>&1; ${CXX:-c++} -dumpfullversion 2>&1 || true)"
  _ds_key="deepspeed-$version-$pytag-$plat-torch$torch-$(printf '%s\n%s' "$_DEEPSPEED_OPS_FLAGS" "$cpu" | sha256sum | cut -c1-8)"
  _ds_dir="$cache/$_ds_key"
}

# Sets _ds_wheel to the cached (or seeded) wheel for DeepSpeed $1 (default: the installed version), building
# nothing; empty when there is none. Call it directly, not in $(...): deepspeed_ops_mark uses the key it sets.
deepspeed_ops_cached_wheel() {
  local seed found
  _ds_wheel=""
  _deepspeed_ops_key "${1:-}"
  [ -z "$_ds_key" ] && return 0
  _ds_wheel="$(ls "$_ds_dir"/deepspeed-*.whl 2>/dev/null | head -n 1 || true)"
  [ -n "$_ds_wheel" ] && return 0
  for seed in ${DEEPSPEED_SEED:-}; do
    found="$(ls "$seed/$_ds_key"/deepspeed-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -n "$found" ] && mkdir -p "$_ds_dir"; then
      echo "[setup] deepspeed: seeding the wheel cache $_ds_dir from $found"
      cp "$found" "$_ds_dir/.seed.tmp" && mv "$_ds_dir/.seed.tmp" "$_ds_dir/$(basename "$found")"
      rm -f "$_ds_dir/FAILED"
      _ds_wheel="$_ds_dir/$(basename "$found")"
      return 0
    fi
  done
}

# Records that $VENV's deepspeed is the wheel of the current key (after installing _ds_wheel some other way).
deepspeed_ops_mark() {
  echo "$_ds_key" > "${VENV:?VENV is not set}/.gpt2_accel-deepspeed-ops"
}

deepspeed_ops_install() {
  local venv=${VENV:?VENV is not set} timeout_s=${DEEPSPEED_BUILD_TIMEOUT:-1800} wheel version tmp found status=0
  local py=$venv/bin/python
  deepspeed_ops_cached_wheel ""
  if [ "$_ds_why" = "deepspeed is not installed" ]; then
    echo "[setup] deepspeed is not installed (EXTRAS): no ops to prebuild"
    return 0
  elif [ -n "$_ds_why" ]; then
    echo "[setup] deepspeed ops: $_ds_why; DeepSpeed compiles its ops just in time."
    return 0
  fi
  # The marker names the wheel installed last: a new torch (TORCH_SPEC) changes the key, so the ops get rebuilt.
  if [ "$_ds_have" = 1 ] && [ "$(cat "$venv/.gpt2_accel-deepspeed-ops" 2>/dev/null)" = "$_ds_key" ]; then
    echo "[setup] deepspeed with prebuilt CPU ops present ($_ds_key)"
    return 0
  fi
  version=$_ds_version wheel=$_ds_wheel
  if ! mkdir -p "$_ds_dir"; then
    echo "[setup] deepspeed ops: the wheel cache $_ds_dir cannot be created (set DEEPSPEED_WHEELS); DeepSpeed compiles its ops just in time."
    return 0
  fi
  if [ -z "$wheel" ] && [ -f "$_ds_dir/FAILED" ] && [ "${DEEPSPEED_REBUILD:-0}" != 1 ]; then
    echo "[setup] deepspeed ops: an earlier build failed ($(cat "$_ds_dir/FAILED")); log: $_ds_dir/build.log; DEEPSPEED_REBUILD=1 retries. DeepSpeed compiles its ops just in time."
    return 0
  fi
  if [ -z "$wheel" ]; then
    echo "[setup] deepspeed $version: building a wheel with its CPU ops once into $_ds_dir (up to ${timeout_s} s; log: $_ds_dir/build.log)"
    rm -f "$_ds_dir/FAILED"
    tmp="$(mktemp -d "$_ds_dir/.build.XXXXXX")"
    # A subshell: DS_BUILD_* left in the caller's environment would add other ops to a wheel keyed on these flags.
    # DS_ENABLE_NINJA: compile the sources in parallel (ninja is a DeepSpeed dependency, in $venv/bin).
    (
      while read -r var; do unset "$var"; done < <(env | grep -o '^DS_BUILD_[A-Z0-9_]*')
      # shellcheck disable=SC2086
      export $_DEEPSPEED_OPS_FLAGS DS_ENABLE_NINJA=1 PATH="$venv/bin:$PATH"
      timeout "$timeout_s" "$py" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
        --no-binary deepspeed "deepspeed==$version" -w "$tmp"
    ) > "$_ds_dir/build.log" 2>&1 || status=$?
    found="$(ls "$tmp"/deepspeed-*.whl 2>/dev/null | head -n 1 || true)"
    if [ "$status" = 0 ] && [ -n "$found" ] && "$py" -c 'import sys, zipfile
names = " ".join(zipfile.ZipFile(sys.argv[1]).namelist())
sys.exit(not all(f"deepspeed/ops/{op}_op." in names for op in ("adam/cpu_adam", "comm/deepspeed_shm_comm")))' "$found"; then
      mv "$found" "$_ds_dir/" && wheel="$_ds_dir/$(basename "$found")"
    else
      if [ "$status" = 124 ]; then status="timed out after ${timeout_s} s (DEEPSPEED_BUILD_TIMEOUT)"
      elif [ "$status" = 0 ]; then status="the wheel lacks the compiled ops"
      else status="pip wheel exit status $status"; fi
      echo "$status" > "$_ds_dir/FAILED"
      echo "[setup] deepspeed ops: building failed: $status; log: $_ds_dir/build.log. The suite still runs; DeepSpeed compiles its ops just in time."
      grep -v "is ignored: it is neither" "$_ds_dir/build.log" | tail -n 5 | cut -c1-200 | sed 's/^/[setup]   /'
    fi
    rm -rf "$tmp"
    [ -z "$wheel" ] && return 0
  fi
  # Same version as installed: only deepspeed's files change, none of its dependencies.
  if "$py" -m pip install --quiet --no-deps --force-reinstall "$wheel"; then
    echo "$_ds_key" > "$venv/.gpt2_accel-deepspeed-ops"
    echo "[setup] deepspeed $version with prebuilt CPU ops installed from the wheel cache ($wheel)"
  else
    echo "[setup] deepspeed ops: installing $wheel failed; DeepSpeed compiles its ops just in time."
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run alone: the repository's .venv unless VENV says otherwise
  set -uo pipefail
  VENV="${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"
  deepspeed_ops_install
fi
