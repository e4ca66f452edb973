#!/usr/bin/env bash
# Body shared by slurm/phase1.sh and slurm/phase2.sh: runs in the batch shell of the job.
#
# One srun task per node starts `accelerate launch`, which starts the node's training processes:
#   --num_machines $SLURM_NNODES, --machine_rank $SLURM_NODEID (read on each node, inside the
#   task, never in this batch shell), --main_process_ip = address of the node list's first host,
#   --main_process_port = 20000 + job id mod 20000 (as mtlxray.launch.slurm.master_port).
#
# Variables (all optional):
#   MTLX_CONFIG            config YAML (default: set by the phase script)
#   MTLX_OVERRIDES         extra `key=value` overrides, space-separated (positional args add more)
#   MTLX_VENV              virtualenv to activate (default $SLURM_SUBMIT_DIR/.venv when present)
#   MTLX_CPU=1             CPU nodes: gloo through ACCELERATE_USE_CPU=1, no GPUs requested
#   MTLX_PROCS_PER_NODE    training processes per node (default: GPUs on the node; 1 with MTLX_CPU=1)
#   MTLX_SAVE_TIMEOUT_S    how long workers may take to save after USR1 (default 100)
# Preemption: USR1 reaches this shell (`--signal=B:USR1@120`, or `scancel --signal=USR1 --batch`);
# the trap forwards it to srun → accelerate → every training process, which saves `last` and
# exits 75; then this script runs `scontrol requeue $SLURM_JOB_ID` and the requeued job resumes
# with `--resume auto`.
set -euo pipefail

EXIT_REQUEUE=75
cd "${SLURM_SUBMIT_DIR:-.}"
venv=${MTLX_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}
# shellcheck disable=SC1091
if [[ -f $venv/bin/activate ]]; then source "$venv/bin/activate"; fi

config=${MTLX_CONFIG:?MTLX_CONFIG must name a config YAML}
if [[ $# -gt 0 && $1 == *.yaml ]]; then config=$1; shift; fi
read -r -a overrides <<<"${MTLX_OVERRIDES:-}"
overrides+=("$@")

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(getent ahostsv4 "$head_node" | awk 'NR == 1 {print $1}' || true)
if [[ -z $head_addr ]]; then
    # Node names need not resolve (several slurmd on one host): ask the controller.
    head_addr=$(scontrol show node -o "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
port=$((20000 + ${SLURM_JOB_ID//[^0-9]/} % 20000))

if [[ ${MTLX_CPU:-0} == 1 ]]; then
    export ACCELERATE_USE_CPU=1
    per_node=${MTLX_PROCS_PER_NODE:-1}
else
    per_node=${MTLX_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
    per_node=${per_node##*:}
fi
total=$((per_node * SLURM_NNODES))
# The launcher passes USR1 on to its workers and waits for them to save before giving up.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${MTLX_SAVE_TIMEOUT_S:-100}
export MTLXRAY_PG_TIMEOUT_S=${MTLXRAY_PG_TIMEOUT_S:-600}

echo "mtlxray: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_NNODES ($SLURM_JOB_NODELIST)" \
    "main $head_addr:$port processes $total config $config overrides ${overrides[*]:-}"

# shellcheck disable=SC2016  # $SLURM_NODEID is expanded by bash -c on each node, not here
launch='exec accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$0" --main_process_port "$1" --num_processes "$2" \
    --mixed_precision no --dynamo_backend no -m mtlxray.cli train --resume auto "${@:3}"'
if [[ $total == 1 ]]; then
    # One process needs no launcher (accelerate refuses --multi_gpu with one process).
    # shellcheck disable=SC2016
    launch='exec python -m mtlxray.cli train --resume auto "${@:3}"'
fi

preempted=0
trap 'preempted=1; echo "mtlxray: USR1 received, asking training to save"; kill -USR1 "$srun_pid" 2>/dev/null || true' USR1

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
    bash -c "$launch" "$head_addr" "$port" "$total" --config "$config" "${overrides[@]}" &
srun_pid=$!
rc=0
# `wait` returns early when the trap fires; keep waiting until srun itself ends.
while :; do
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $preempted == 1 || $rc == "$EXIT_REQUEUE" ]]; then
    echo "mtlxray: training saved (exit $rc); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "mtlxray: training finished with exit $rc"
exit "$rc"
