#!/bin/bash
# One SLURM node's launch (train.sbatch runs it once per node with srun): torchrun with this node's rank and the
# main node's address read from SLURM's variables, one process per GPU, each running scripts/train.py "$@".
#
#   SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID   set by SLURM (the main node: the list's first host)
#   SLURM_JOB_ID                                     the rendezvous port is 20000 + the job id modulo 10000
#   CLIP_ACCEL_MASTER_PORT                           or this port
#   CLIP_ACCEL_PROCS_PER_NODE / SLURM_GPUS_ON_NODE   processes on this node (in that order; default 1)
#   SLURM_RESTART_COUNT                              > 0 in a requeued job: --resume_from_checkpoint latest_if_any
#                                                    is added (the newest checkpoint, or from scratch if none yet)
# A value that cannot be right (SLURM_NNODES=0, a SLURM_NODEID outside 0..SLURM_NNODES-1, a job id or a port that
# is not a number, ...) stops the script at once with one line naming the variable, status 2.
#
# Preemption: SIGUSR1 (train.sbatch's --signal) or SIGTERM reaches every process of the job step, and this script
# hands it to the training processes too. torchrun and its processes start with both signals blocked: torchrun
# never acts on them, and each training process reads them with their sender (clip_accel/preemption.py), so one
# that arrives during start-up is kept, and a SIGTERM from torchrun itself (stopping the survivors of a failed run)
# is not taken for a preemption. The training processes write a checkpoint at their next logging step (before
# their first step when it arrives during start-up: none is needed) and exit, naming it in the file
# CLIP_ACCEL_PREEMPTED_FILE names. Only then does this script exit with 75 and, on the main node, requeue the job
# (scontrol requeue); a run that failed without naming one (a crash) is not requeued, and its status is kept.
set -uo pipefail
cd "$(dirname "$0")/../.."

stop() {  # a wrong variable: say which, before anything starts
    echo "clip-accel: $1" >&2
    exit 2
}
[[ ${SLURM_NNODES-} =~ ^[1-9][0-9]*$ ]] ||
    stop "SLURM_NNODES=${SLURM_NNODES-} is not a number of nodes (1 or more): start this script with srun."
[[ ${SLURM_NODEID-} =~ ^[0-9]+$ ]] && ((10#$SLURM_NODEID < SLURM_NNODES)) ||
    stop "SLURM_NODEID=${SLURM_NODEID-} is not a node of this job's $SLURM_NNODES (0 to $((SLURM_NNODES - 1)))."
[[ ${SLURM_JOB_ID-} =~ ^[0-9]+$ ]] || stop "SLURM_JOB_ID=${SLURM_JOB_ID-} is not a job id (a number)."
[ -n "${SLURM_JOB_NODELIST-}" ] || stop "SLURM_JOB_NODELIST is empty: no node to rendezvous on."
main_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[ -n "$main_node" ] || stop "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST names no host (scontrol show hostnames)."
port=${CLIP_ACCEL_MASTER_PORT:-$((20000 + 10#$SLURM_JOB_ID % 10000))}
[[ $port =~ ^[0-9]+$ ]] && ((10#$port >= 1 && 10#$port <= 65535)) ||
    stop "CLIP_ACCEL_MASTER_PORT=$port is not a port (1 to 65535)."
procs_from=CLIP_ACCEL_PROCS_PER_NODE
[ -n "${CLIP_ACCEL_PROCS_PER_NODE-}" ] || procs_from=SLURM_GPUS_ON_NODE
procs=${!procs_from:-1}
[[ ${procs%%(*} =~ ^[1-9][0-9]*$ ]] ||  # SLURM_GPUS_ON_NODE may read "8(IDX:0-7)" on some versions
    stop "$procs_from=$procs is not a number of processes (1 or more)."
procs=${procs%%(*}
[[ ${SLURM_RESTART_COUNT:-0} =~ ^[0-9]+$ ]] || stop "SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT is not a number."
resume=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    resume=(--resume_from_checkpoint latest_if_any)
fi

preempted_dir=$(mktemp -d)
trap 'rm -rf "$preempted_dir"' EXIT
export CLIP_ACCEL_PREEMPTED_FILE=$preempted_dir/checkpoint
# torchrun (and every process it starts) with SIGUSR1 and SIGTERM blocked; ignored by the subshell until then.
(
    trap '' USR1 TERM
    exec python -c '
import os, signal, sys
preemption = {signal.SIGUSR1, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, preemption)
for number in preemption:
    signal.signal(number, signal.SIG_DFL)  # (blocked: they wait, pending)
os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", *sys.argv[1:]])' \
        --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$procs" \
        --master_addr "$main_node" --master_port "$port" scripts/train.py "$@" "${resume[@]}"
) &
launcher=$!
signalled=0
forward() {  # to the training processes (torchrun's children)
    signalled=1
    pkill "-$1" -P "$launcher"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while true; do  # a trapped signal interrupts wait: wait again until the run has ended
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break
done
if [ -f "$CLIP_ACCEL_PREEMPTED_FILE" ]; then
    checkpoint=$(<"$CLIP_ACCEL_PREEMPTED_FILE")
    status=75  # EX_TEMPFAIL, as the training processes exit: torchrun reports any failing worker as 1
    if [ "$SLURM_NODEID" -eq 0 ]; then
        if [ -n "$checkpoint" ]; then
            echo "clip-accel: preempted; requeueing job $SLURM_JOB_ID: the requeued job resumes from $checkpoint" >&2
        else
            echo "clip-accel: preempted during start-up, before any checkpoint; requeueing job $SLURM_JOB_ID: the" \
                "requeued job starts from scratch" >&2
        fi
        scontrol requeue "$SLURM_JOB_ID"
    fi
elif [ "$signalled" -eq 1 ] && [ "$status" -ne 0 ]; then
    echo "clip-accel: preempted, but the run failed (status $status) without writing a checkpoint: not requeueing" \
        "job $SLURM_JOB_ID" >&2
fi
exit "$status"
