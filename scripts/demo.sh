#!/usr/bin/env bash
# The demo: set up .venv (once), train a small GPT-2 on the bundled Shakespeare with `accelerate launch`,
# then sample from the saved checkpoint. Extra arguments override recipe keys: scripts/demo.sh --max_steps=50
#   RECIPE=recipes/speedrun.yaml bash scripts/demo.sh   the speedrun recipe instead (Muon, modern blocks, EDM2):
#                                                       a lower loss in about a quarter of the time (docs/speedrun.md)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
RECIPE="${RECIPE:-recipes/demo.yaml}"
OUT="runs/$(basename "$RECIPE" .yaml)"  # runs/demo for the default recipe
ARGS=(--output_dir="$OUT")
for a in "$@"; do case "$a" in --output_dir=*) OUT="${a#--output_dir=}"; ARGS=();; esac; done
# One process using every core (accelerate's own default, passed explicitly so it does not print a warning).
accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 1 \
  --num_cpu_threads_per_process "$(nproc 2>/dev/null || echo 1)" -m gpt2_accel.train "$RECIPE" \
  "${ARGS[@]}" "$@"
echo
echo "=== samples from $OUT (loss curve: $OUT/loss_curve.png, metrics: $OUT/metrics.jsonl) ==="
gpt2-accel sample --model "$OUT" --prompt "ROMEO:" --num_samples 2 --max_new_tokens 120 --temperature 0.8 --top_k 200 --seed 1
