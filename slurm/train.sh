#!/usr/bin/env bash
# Body shared by slurm/phase1.sh and slurm/phase2.sh: runs in the batch shell of the job.
#
# One srun task per training process (the job's --ntasks-per-node: one per GPU, or one per node
# on CPU nodes; the same layout as `mtlxray submit`) runs `python -m mtlxray.cli train --resume
# auto`. Each task reads its rank from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) through
# mtlxray.dist, and all of them meet at the address and port that `python -m mtlxray.dist
# rendezvous` gives here (the job's first host, a port derived from the job id).
#
# Variables (all optional):
#   MTLX_CONFIG            config YAML (default: set by the phase script)
#   MTLX_OVERRIDES         extra `key=value` overrides, space-separated (positional args add more)
#   MTLX_VENV              virtualenv to activate (default $SLURM_SUBMIT_DIR/.venv when present)
#   MTLX_CPU=1             CPU nodes: no GPU is used, gloo (pass --gpus-per-node=0 to sbatch)
#   MTLXRAY_PG_TIMEOUT_S   process-group timeout (default here 600 s)
# Preemption and time limits: USR2 reaches this shell (`--signal=B:USR2@120`, or
# `scancel --signal=USR2 --batch`), the signal and delay `mtlxray submit` asks for too
# (mtlxray.launch.slurm.PREEMPT_SIGNAL, launch.requeue_signal_delay_s); the trap hands it to srun,
# which passes it to every training process; they save `last` at the same step and exit 75; then
# this script runs `scontrol requeue $SLURM_JOB_ID` and exits 75, and the requeued job resumes with
# --resume auto.
set -euo pipefail

EXIT_REQUEUE=75
cd "${SLURM_SUBMIT_DIR:-.}"
venv=${MTLX_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi

config=${MTLX_CONFIG:?MTLX_CONFIG must name a config YAML}
if [[ $# -gt 0 && $1 == *.y*ml ]]; then config=$1; shift; fi
read -r -a overrides <<<"${MTLX_OVERRIDES:-}"
overrides+=("$@")

srun_pid=""
received=""
signals=0
on_signal() {
    signals=$((signals + 1))
    received=SIG$1
    if [[ -z $srun_pid ]]; then
        # Training has not started: nothing to save, come back later.
        echo "mtlxray: $received received before training started; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit "$EXIT_REQUEUE"
    fi
    echo "mtlxray: $received received: asking training to save"
    kill -"$1" "$srun_pid" 2>/dev/null || true
}
trap 'on_signal USR2' USR2

# The tasks' identity comes from Slurm alone: nothing of a launcher this job was submitted from.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT
if ! rendezvous=$(python -m mtlxray.dist rendezvous); then
    echo "mtlxray: error: no rendezvous for job $SLURM_JOB_ID (see above)" >&2
    exit 2
fi
read -r MASTER_ADDR MASTER_PORT <<<"$rendezvous"
export MASTER_ADDR MASTER_PORT
if [[ ${MTLX_CPU:-0} == 1 ]]; then
    export ACCELERATE_USE_CPU=1 CUDA_VISIBLE_DEVICES=""
fi
export MTLXRAY_PG_TIMEOUT_S=${MTLXRAY_PG_TIMEOUT_S:-600}

echo "mtlxray: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_NNODES ($SLURM_JOB_NODELIST)" \
    "main $MASTER_ADDR:$MASTER_PORT processes $SLURM_NTASKS config $config overrides ${overrides[*]:-}"

# srun reports every task that exits non-zero as an error; 75 is the requeue handshake, not an
# error, so those lines (and only those) are kept out of the log.
exec 3> >(grep --line-buffered -v -E '^srun: error: .*: Exited with exit code 75$' >&2)
filter_pid=$!
srun --kill-on-bad-exit=0 python -m mtlxray.cli train --resume auto --config "$config" "${overrides[@]}" 2>&3 &
srun_pid=$!
# A trapped signal cuts `wait` short (status > 128) without reaping srun: wait again then.
rc=0
wait "$srun_pid" || rc=$?
while ((rc > 128 && signals > 0)); do
    again=0
    wait "$srun_pid" || again=$?
    ((again == 127)) && break  # srun had ended: rc was its status
    rc=$again
done
exec 3>&-
wait "$filter_pid" 2>/dev/null || true

if [[ $rc == "$EXIT_REQUEUE" ]]; then
    echo "mtlxray: training saved after ${received:-a signal} (exit $rc); requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "mtlxray: error: scontrol requeue $SLURM_JOB_ID failed; resubmit the job to resume from checkpoints/last" >&2
    fi
    exit "$EXIT_REQUEUE"
fi
echo "mtlxray: training finished with exit $rc"
exit "$rc"
