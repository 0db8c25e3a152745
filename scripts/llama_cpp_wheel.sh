#!/usr/bin/env bash
# Installs llama-cpp-python (llama.cpp's Python binding; the slow GGUF tests run exports in it) into $VENV from a
# wheel cache outside the clone. The wheel is compiled once per version, Python, platform and build flags (llama.cpp:
# ~5 min on 2 idle cores, 25+ loaded) and reused by every later set-up, CI runs and fresh clones included.
# Sourced by scripts/setup_env.sh (LLAMA_CPP=1, the default); also runs alone: bash scripts/llama_cpp_wheel.sh
#
#   LLAMA_CPP_VERSION        default 0.3.36, the version docs/export.md's checks ran with. It is not in the lock
#                            (constraints.txt): the wheel is built for this machine, so the pin lives here.
#   LLAMA_CPP_WHEELS         the cache (default: ${XDG_CACHE_HOME:-~/.cache}/gpt2_accel/wheels)
#   LLAMA_CPP_SEED           directories holding a wheel already built with the CMAKE_ARGS below (e.g. a CI cache
#                            restore); a wheel of the right version and tag found there is copied into the cache
#   LLAMA_CPP_BUILD_TIMEOUT  seconds the build may take (default 1800: ~5-20 min on 2 cores, so CI, 90 min in all, keeps time for the suite)
#
# Why our own cache and not pip's (which also keeps wheels it built): pip's key is the download URL, not the build
# flags, so a wheel built with other CMAKE_ARGS (e.g. -march=native from a developer's machine) would be reused
# silently; pip's cache is often disabled or cleared in CI (--no-cache-dir, PIP_NO_CACHE_DIR, `pip cache purge`);
# and a directory of named wheels can be copied between machines or restored by a CI cache step. The build itself
# runs with --no-cache-dir so that this directory is the only copy.
#
# A failed or timed-out build never fails the set-up: it prints why, keeps the log next to the cache, exports
# GPT2_ACCEL_LLAMA_CPP_STATUS (the llama.cpp tests put it in their skip reason), and is not retried until
# LLAMA_CPP_REBUILD=1 (a retry costs the build time again).

llama_cpp_install() {
  local venv=${VENV:?VENV is not set} version=${LLAMA_CPP_VERSION:-0.3.36}
  local cache=${LLAMA_CPP_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/gpt2_accel/wheels}
  local timeout_s=${LLAMA_CPP_BUILD_TIMEOUT:-1800} py=$venv/bin/python
  # Portable CPU build (GGML_NATIVE=OFF: no -march=native, so a cached wheel runs on other x86-64 CPUs with AVX2);
  # only the library and its Python binding, none of llama.cpp's programs.
  local cmake_args="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF"
  local have pytag plat key dir wheel seed found
  have="$("$py" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
  if [ "$have" = "$version" ] && "$py" -c "import llama_cpp" 2>/dev/null; then
    export GPT2_ACCEL_LLAMA_CPP_STATUS="llama-cpp-python $version installed"
    echo "[setup] llama-cpp-python $version present"
    return 0
  fi
  read -r pytag plat < <("$py" -c 'import sys, sysconfig
print(f"cp{sys.version_info[0]}{sys.version_info[1]}", sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
  key="llama_cpp_python-$version-$pytag-$plat-$(printf '%s' "$cmake_args" | sha256sum | cut -c1-8)"
  dir="$cache/$key"
  if ! mkdir -p "$dir"; then
    export GPT2_ACCEL_LLAMA_CPP_STATUS="the wheel cache $dir cannot be created (set LLAMA_CPP_WHEELS)"
    echo "[setup] llama-cpp-python: $GPT2_ACCEL_LLAMA_CPP_STATUS; the llama.cpp tests will skip."
    return 0
  fi
  wheel="$(ls "$dir"/llama_cpp_python-"$version"-*-"$plat".whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$wheel" ]; then
    for seed in ${LLAMA_CPP_SEED:-}; do
      found="$(ls "$seed"/llama_cpp_python-"$version"-*-"$plat".whl 2>/dev/null | head -n 1 || true)"
      if [ -n "$found" ]; then
        echo "[setup] llama-cpp-python: seeding the wheel cache $dir from $found"
        cp "$found" "$dir/.seed.tmp" && mv "$dir/.seed.tmp" "$dir/$(basename "$found")"
        wheel="$dir/$(basename "$found")"
        break
      fi
    done
  fi
  if [ -z "$wheel" ] && [ -f "$dir/FAILED" ] && [ "${LLAMA_CPP_REBUILD:-0}" != 1 ]; then
    export GPT2_ACCEL_LLAMA_CPP_STATUS="an earlier build of llama-cpp-python $version failed ($(cat "$dir/FAILED")); log: $dir/build.log; LLAMA_CPP_REBUILD=1 retries"
    echo "[setup] llama-cpp-python: $GPT2_ACCEL_LLAMA_CPP_STATUS. The llama.cpp tests will skip."
    return 0
  fi
  if [ -z "$wheel" ]; then
    echo "[setup] llama-cpp-python $version: building the wheel once into $dir (compiles llama.cpp; up to ${timeout_s} s; log: $dir/build.log)"
    rm -f "$dir/FAILED"
    local tmp status=0
    tmp="$(mktemp -d "$dir/.build.XXXXXX")"
    CMAKE_ARGS="$cmake_args" timeout "$timeout_s" "$py" -m pip wheel --no-deps --no-cache-dir \
      --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$tmp" > "$dir/build.log" 2>&1 || status=$?
    found="$(ls "$tmp"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
    if [ "$status" = 0 ] && [ -n "$found" ]; then
      mv "$found" "$dir/" && wheel="$dir/$(basename "$found")"
    else
      [ "$status" = 124 ] && status="timed out after ${timeout_s} s (LLAMA_CPP_BUILD_TIMEOUT)" || status="pip wheel exit status $status"
      echo "$status" > "$dir/FAILED"
      export GPT2_ACCEL_LLAMA_CPP_STATUS="building llama-cpp-python $version failed: $status; log: $dir/build.log"
      echo "[setup] llama-cpp-python: $GPT2_ACCEL_LLAMA_CPP_STATUS. The suite still runs; the llama.cpp tests will skip."
      grep -v "is ignored: it is neither" "$dir/build.log" | tail -n 5 | cut -c1-200 | sed 's/^/[setup]   /'
    fi
    rm -rf "$tmp"
    [ -z "$wheel" ] && return 0
  fi
  # The binding's own dependencies (numpy, typing-extensions, jinja2) stay at the lock's versions; diskcache, the
  # one it adds, is not in the lock (lock.sh leaves llama_cpp out).
  local constraints=()
  [ -f "$venv/.constraints.txt" ] && [ "${LOCK:-1}" = 1 ] && constraints=(-c "$venv/.constraints.txt")
  if "$py" -m pip install --quiet "${constraints[@]}" "$wheel"; then
    export GPT2_ACCEL_LLAMA_CPP_STATUS="llama-cpp-python $version installed from $wheel"
    echo "[setup] llama-cpp-python $version installed from the wheel cache ($wheel)"
  else
    export GPT2_ACCEL_LLAMA_CPP_STATUS="installing $wheel failed"
    echo "[setup] llama-cpp-python: $GPT2_ACCEL_LLAMA_CPP_STATUS; the llama.cpp tests will skip."
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run alone: the repository's .venv unless VENV says otherwise
  set -uo pipefail
  VENV="${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"
  llama_cpp_install
fi
