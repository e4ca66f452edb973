#!/usr/bin/env bash
# Phase 1 (lung segmentation + classification) as a Slurm batch job.
#
# Submit from the repository root (the job runs slurm/train.sh and reads configs/ from there):
#   sbatch slurm/phase1.sh                      # configs/phase1.yaml on 1 node with 8 GPUs
#   sbatch --nodes=4 --time=12:00:00 slurm/phase1.sh configs/phase1.yaml optim.lr=2e-4
#   MTLX_CPU=1 sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 slurm/phase1.sh configs/demo.yaml
# Arguments: an optional config YAML, then `key=value` overrides. Variables (MTLX_CONFIG,
# MTLX_OVERRIDES, MTLX_VENV, MTLX_CPU) are described in slurm/train.sh.
#
# The defaults below are those of the config's `launch:` section (mtlxray.config.LaunchConfig, as
# mtlxray.launch.slurm.sbatch_header writes them; a test holds them equal): one task, i.e. one
# training process, per GPU with 8 CPUs each, 24 h, and USR2 120 s before the time limit to save and
# requeue (the signal and delay `mtlxray submit` asks for too). Override any of them on the sbatch
# command line. A request that the partition can never run is accepted by sbatch and pends forever
# (Reason=PartitionConfig): `sbatch --test-only ...` checks first, and slurm/pipeline.sh and
# `mtlxray submit` do it for you. The log goes to runs/slurm-<job id>.out (runs/ ships with the
# repository).
#SBATCH --job-name=mtlx-phase1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out
export MTLX_CONFIG=${MTLX_CONFIG:-configs/phase1.yaml}
scripts=${MTLX_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm
exec bash "$scripts/train.sh" "$@"
