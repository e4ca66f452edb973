#!/usr/bin/env bash
# Phase 2 (lung + infection segmentation + classification, from phase 1) as a Slurm batch job.
#
#   sbatch slurm/phase2.sh [CONFIG.yaml] [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --time=12:00:00 slurm/phase2.sh
#   MTLX_CPU=1 sbatch --nodes=2 --gpus-per-node=0 slurm/phase2.sh configs/demo.yaml
#
# Submit from the repository root (the job reads slurm/train.sh and configs/ from there). Any
# #SBATCH line below can be overridden on the sbatch command line or by SBATCH_* variables.
# Variables (MTLX_CONFIG, MTLX_OVERRIDES, MTLX_VENV, MTLX_CPU, MTLX_PROCS_PER_NODE,
# MTLX_SAVE_TIMEOUT_S) are described in slurm/train.sh. The output folder must exist.
#SBATCH --job-name=mtlx-phase2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=runs/slurm-%j.out
export MTLX_CONFIG=${MTLX_CONFIG:-configs/phase2.yaml}
exec bash "${MTLX_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/train.sh" "$@"
