#!/usr/bin/env bash
# Submit phase 1, then phase 2 with --dependency=afterok:<phase 1>, and print both job ids.
#
#   slurm/pipeline.sh [sbatch options ...]            (or: sbatch slurm/pipeline.sh ...)
#   MTLX_CPU=1 slurm/pipeline.sh --nodes=2 --gpus-per-node=0 --cpus-per-task=1
#
# sbatch options apply to both jobs. Variables:
#   MTLX_PHASE1_CONFIG   phase 1 YAML (default configs/phase1.yaml)
#   MTLX_PHASE2_CONFIG   phase 2 YAML (default configs/phase2.yaml)
#   MTLX_OVERRIDES       `key=value` overrides for both phases, space-separated
#   MTLX_PHASE1_OVERRIDES, MTLX_PHASE2_OVERRIDES   overrides for one phase only
# Phase 2 gets phase.init_from=<phase 1 run>/checkpoints/best. Each job logs to
# <run dir>/slurm-<job id>.out. Other MTLX_* variables reach the jobs (see slurm/train.sh).
# Run from the repository root. Prints `phase1 <id>` and `phase2 <id>`.
set -euo pipefail

root=${MTLX_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$root"
venv=${MTLX_VENV:-$root/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi

cfg1=${MTLX_PHASE1_CONFIG:-configs/phase1.yaml}
cfg2=${MTLX_PHASE2_CONFIG:-configs/phase2.yaml}
read -r -a common <<<"${MTLX_OVERRIDES:-}"
read -r -a over1 <<<"${MTLX_PHASE1_OVERRIDES:-}"
read -r -a over2 <<<"${MTLX_PHASE2_OVERRIDES:-}"

# The run folder of a config after overrides: <run.output_dir>/<run.name>.
run_dir() {
    python - "$@" <<'PY'
import sys
from pathlib import Path
from mtlxray.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(Path(cfg.run.output_dir) / cfg.run.name)
PY
}

dir1=$(run_dir "$cfg1" "${common[@]}" "${over1[@]}")
over2+=("phase.init_from=$dir1/checkpoints/best")
dir2=$(run_dir "$cfg2" "${common[@]}" "${over2[@]}")
mkdir -p "$dir1" "$dir2"

# Variables reach the jobs through sbatch's default --export=ALL.
job1=$(MTLX_CONFIG=$cfg1 MTLX_OVERRIDES="${common[*]} ${over1[*]}" \
    sbatch --parsable --output="$dir1/slurm-%j.out" "$@" slurm/phase1.sh)
job1=${job1%%;*}
job2=$(MTLX_CONFIG=$cfg2 MTLX_OVERRIDES="${common[*]} ${over2[*]}" \
    sbatch --parsable --dependency="afterok:$job1" --output="$dir2/slurm-%j.out" "$@" slurm/phase2.sh)
job2=${job2%%;*}
echo "phase1 $job1"
echo "phase2 $job2"
