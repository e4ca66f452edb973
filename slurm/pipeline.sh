#!/usr/bin/env bash
# Submit a chain of phases: each runs after the previous one succeeded (--dependency=afterok) and
# starts from its best checkpoint. Prints one `phase<k> <job id>` line per phase.
#
#   slurm/pipeline.sh [sbatch options ...] [CONFIG.yaml ...]
#   slurm/pipeline.sh                                   # configs/phase1.yaml, then configs/phase2.yaml
#   slurm/pipeline.sh --nodes=2 --partition=gpu         # sbatch options apply to every job
#   slurm/pipeline.sh configs/a.yaml configs/b.yaml configs/c.yaml      # any number of phases
#   MTLX_CPU=1 slurm/pipeline.sh --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#       configs/demo.yaml configs/demo_phase2.yaml
#
# Arguments ending in .yaml (or .yml) are the phases' configs, in order; the others are sbatch
# options for every job. Variables:
#   MTLX_OVERRIDES           `key=value` overrides for every phase, space-separated
#   MTLX_PHASE<k>_OVERRIDES  overrides for phase k only (1-based)
#   MTLX_PHASE1_CONFIG, MTLX_PHASE2_CONFIG   the two configs when none is given (default
#                            configs/phase1.yaml, configs/phase2.yaml)
# Phase k>1 gets phase.init_from=<run dir of phase k-1>/checkpoints/best. Each job logs to
# <run dir>/slurm-<job id>.out. Other MTLX_* variables reach the jobs (see slurm/train.sh).
# Before anything is submitted, the chain is checked (`python -m mtlxray.cli.chain`: configs,
# shards, run folders, the init_from chain) and every job is put to `sbatch --test-only`, so that
# a mistake or a request the cluster can never run fails at once, in one line, with nothing queued.
# Run from the repository root.
set -euo pipefail

die() { echo "pipeline.sh: error: $*" >&2; exit "${rc:-1}"; }

root=${MTLX_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$root"
scripts=slurm
venv=${MTLX_VENV:-$root/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi

sbatch_opts=()
configs=()
for arg in "$@"; do
    case $arg in
        *.yaml | *.yml) configs+=("$arg") ;;
        *) sbatch_opts+=("$arg") ;;
    esac
done
if [[ ${#configs[@]} -eq 0 ]]; then
    configs=("${MTLX_PHASE1_CONFIG:-configs/phase1.yaml}" "${MTLX_PHASE2_CONFIG:-configs/phase2.yaml}")
fi

chain_args=(--overrides "${MTLX_OVERRIDES:-}")
for ((k = 1; k <= ${#configs[@]}; k++)); do
    var=MTLX_PHASE${k}_OVERRIDES
    if [[ -n ${!var:-} ]]; then chain_args+=(--phase-overrides "$k" "${!var}"); fi
done
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
rc=0
plan=$(python -m mtlxray.cli.chain "${chain_args[@]}" "${configs[@]}" 2>"$errors") || rc=$?
if [[ $rc -ne 0 ]]; then
    msg=$(sed -n 's/^error: //p' "$errors" | tail -n 1)
    die "${msg:-$(tail -n 1 "$errors")}; nothing was submitted"
fi

# One line per phase: index, config, run dir, overrides (init_from included).
phases=()
while IFS= read -r line; do phases+=("$line"); done <<<"$plan"

script_for() { if [[ $1 -eq 1 ]]; then echo "$scripts/phase1.sh"; else echo "$scripts/phase2.sh"; fi; }

# Ask Slurm first whether it could ever run each job: an impossible request would pend forever.
for line in "${phases[@]}"; do
    IFS=$'\t' read -r k cfg dir over <<<"$line"
    if ! out=$(sbatch --test-only "${sbatch_opts[@]}" "$(script_for "$k")" 2>&1); then
        rc=1 die "phase $k ($cfg): the cluster cannot run this job: $(tail -n 1 <<<"$out")"
    fi
done

submitted=()
cancel_submitted() { if [[ ${#submitted[@]} -gt 0 ]]; then scancel "${submitted[@]}" || true; fi; }
prev=""
for line in "${phases[@]}"; do
    IFS=$'\t' read -r k cfg dir over <<<"$line"
    mkdir -p "$dir"
    dep=()
    if [[ -n $prev ]]; then dep=(--dependency="afterok:$prev"); fi
    name=$(basename "$dir")
    # Variables reach the jobs through sbatch's default --export=ALL.
    if ! job=$(MTLX_CONFIG=$cfg MTLX_OVERRIDES=$over sbatch --parsable --job-name="mtlx-$name" \
        --output="$dir/slurm-%j.out" "${dep[@]}" "${sbatch_opts[@]}" "$(script_for "$k")"); then
        cancel_submitted
        rc=1 die "phase $k ($cfg): sbatch failed (see above); nothing of the chain is left queued"
    fi
    job=${job%%;*}
    submitted+=("$job")
    prev=$job
    echo "phase$k $job"
done
