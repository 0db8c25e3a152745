#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_multinode.sh recipes/train_gpt2.yaml [--key=value ...]
#   CONFIG=accelerate_configs/deepspeed_zero2.yaml sbatch scripts/slurm_multinode.sh recipes/train_gpt2.yaml
#
# The node with SLURM_NODEID 0 is the main node (machine_rank 0); its address and a shared port reach every node.
# output_dir must be on a filesystem every node sees. Adjust the #SBATCH lines to your cluster.
#SBATCH --job-name=gpt2-accel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # ONE launcher per node; it starts the per-GPU processes itself
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

RECIPE="${1:?usage: sbatch scripts/slurm_multinode.sh RECIPE.yaml [--key=value ...]}"
shift
CONFIG="${CONFIG:-accelerate_configs/ddp_multinode.yaml}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NNODES="${SLURM_NNODES:-1}"
MAIN_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"  # the same on every node, unlikely to clash

# Per-node environment: NCCL picks the fast interconnect itself; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA if not.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TOKENIZERS_PARALLELISM=false

ARGS="$(printf ' %q' "$@")"  # recipe overrides, quoted for the inner shell

# srun starts this block once per node; SLURM_NODEID (0..NNODES-1) is expanded on each node, hence the quotes.
srun --kill-on-bad-exit=1 bash -c "
  accelerate launch --config_file '$CONFIG' \
    --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port $MAIN_PORT \
    -m gpt2_accel.train '$RECIPE'$ARGS
"
