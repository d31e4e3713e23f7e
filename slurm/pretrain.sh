#!/bin/bash
# shellcheck disable=SC2317  # (the signal handlers below are called from traps)
# Pretrain VL-BERT on a Slurm cluster, with checkpoint-and-requeue before the time limit.
#
#   sbatch slurm/pretrain.sh configs/base_e2e.yaml [--set KEY=VALUE ...]    # from the repository root
#   sbatch --nodes=4 --time=48:00:00 slurm/pretrain.sh configs/large_e2e.yaml --set optim.lr=2e-5
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/pretrain.sh configs/demo.yaml
#                                   # CPU-only nodes: no GPUs requested, the trainer uses gloo
#
# Options on the sbatch command line override the #SBATCH lines below. Keep
# --ntasks-per-node equal to --gpus-per-node: one trainer process per GPU; on CPU
# nodes the trainer uses gloo. The config path and overrides are relative to the
# repository root.
# Slurm opens the log files before this script runs, so logs/ must exist in the
# folder sbatch is run from (the repository ships it).
#
# Environment (read at submission; sbatch passes the submitting shell's environment on):
#   VLBERT_PYTHON        interpreter (default: the repository's .venv/bin/python if present, else python)
#   VLBERT_OUTPUT_DIR    becomes --set runtime.output_dir=... (an explicit override on the command line wins)
#   MLFLOW_TRACKING_URI  passed through to the trainer (the config's tracking.tracking_uri wins if set)
#   VLBERT_ROOT          repository root (default: the folder sbatch was run from)
#   VLBERT_MASTER_PORT   rendezvous port (default: derived from the job id)
#
# Preemption and time limits: Slurm sends USR1 to this script 120 s before the
# time limit (or when you run `scancel --signal=USR1 --batch JOBID`). The script
# forwards it to the trainers, which finish the step, save a checkpoint and exit
# 0; the script then requeues the job, and the requeued job (same id, log
# appended) resumes from the latest checkpoint into the same MLflow run (the run
# id is stored in the checkpoint). Slurm delays a requeued job's start by about
# two minutes (Reason=BeginTime). Never requeued: a trainer failure (non-zero
# exit), and a job that got SIGTERM (scancel; Slurm requeues preempted jobs itself).
#
# One job per output folder: --dependency=singleton holds a job while another of yours
# with the same --job-name runs (so give each run its own name), and the trainer takes
# a lease on its output folder (runtime.lease_stale_minutes): a second job on the same
# folder exits at once naming the holder.
#
#SBATCH --job-name=vlbert
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --dependency=singleton
# B: sends the warning to this batch shell only. Sent to the tasks instead
# (--signal=USR1@120), the trainers would save and exit 0 and this script could not
# tell a preemption from a finished run, so it would not know to requeue. The
# shell records the signal and forwards it to the trainers through srun.
#SBATCH --signal=B:USR1@120

set -uo pipefail  # no -e: srun's exit status is handled below

if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/pretrain.sh CONFIG.yaml [--set KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG="$1"
shift

ROOT="${VLBERT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT" || { echo "[vlbert] cannot enter the repository root $ROOT" >&2; exit 2; }
ENTRY="${VLBERT_ENTRY:-tools/train.py}"  # slurm/finetune.sh sets tools/finetune.py
if [ ! -f "$ENTRY" ]; then
  echo "[vlbert] $ROOT has no $ENTRY: run sbatch from the repository root or set VLBERT_ROOT" >&2
  exit 2
fi
if [ -z "${VLBERT_PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then VLBERT_PYTHON="$ROOT/.venv/bin/python"; else VLBERT_PYTHON=python; fi
fi

OVERRIDES=()
# The environment's output folder comes first, so that an explicit override given to sbatch wins.
[ -n "${VLBERT_OUTPUT_DIR:-}" ] && OVERRIDES+=(--set "runtime.output_dir=$VLBERT_OUTPUT_DIR")
OVERRIDES+=("$@")

# Rendezvous: the first node of the allocation hosts the TCP store. Its NodeAddr is
# what Slurm itself uses to reach it (it equals the node name unless slurm.conf says
# otherwise). The port depends on the job id, so jobs sharing a node do not collide,
# and stays the same when the job is requeued (same id).
FIRST_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
NODE_ADDR="$(scontrol show node "$FIRST_NODE" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
export MASTER_ADDR="${NODE_ADDR:-$FIRST_NODE}"
export MASTER_PORT="${VLBERT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}"
# A requeued job keeps its submission environment, SLURM_NTASKS of the first allocation included,
# even when it was given another node count while it waited (scontrol update JobId=N NumTasks=..
# NumNodes=..): with --ntasks-per-node, count the tasks from the nodes it has now. The trainer
# resumes on the new world size (docs/pretraining.md: Resuming on another layout).
NTASKS="$SLURM_NTASKS"
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ -n "${SLURM_JOB_NUM_NODES:-}" ]; then
  NTASKS=$(( SLURM_JOB_NUM_NODES * ${SLURM_NTASKS_PER_NODE%%[!0-9]*} ))
fi
export WORLD_SIZE="$NTASKS"
export PYTHONUNBUFFERED=1
# CPU runs: one BLAS/OpenMP thread per allocated core, not one per core of the machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
[ -n "${MLFLOW_TRACKING_URI:-}" ] && export MLFLOW_TRACKING_URI

# NCCL settings clusters commonly need; uncomment what yours does.
# The network interface NCCL (and gloo) bootstrap on; pick the fast one, or exclude
# loopback and docker bridges ("^lo,docker"):
#   export NCCL_SOCKET_IFNAME=ib0
#   export GLOO_SOCKET_IFNAME=ib0
# No InfiniBand (or a broken IB setup): fall back to TCP sockets.
#   export NCCL_IB_DISABLE=1
# Which IB adapters/ports to use (e.g. mlx5_0:1,mlx5_1:1):
#   export NCCL_IB_HCA=mlx5
# Log NCCL's choice of transports and rings once at start-up (WARN for quiet runs):
#   export NCCL_DEBUG=INFO
# GPUs without working peer-to-peer (some PCIe virtual machines):
#   export NCCL_P2P_DISABLE=1
# Fail fast instead of hanging when a rank dies in a collective (torch's default in recent releases):
#   export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "[vlbert] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, python $VLBERT_PYTHON, $(date -Is)"
echo "[vlbert] config $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
[ -n "${MLFLOW_TRACKING_URI:-}" ] && echo "[vlbert] MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"

GOT_USR1=0
GOT_TERM=0
SRUN_PID=""
RESENDER=""
ask_trainers_to_stop() {
  [ -n "$SRUN_PID" ] || return 0  # srun not started yet: asked right after it starts
  kill -USR1 "$SRUN_PID" 2>/dev/null  # srun forwards USR1 to every task
  # A trainer still starting up ignores USR1 until its handler is installed (see the
  # task wrapper below), so repeat the request until the trainers are gone.
  if [ -z "$RESENDER" ]; then
    # (Its sleep is killed with it: Slurm's process tracking may not find an orphan.)
    (
      trap '[ -n "${nap:-}" ] && kill "$nap" 2>/dev/null; exit 0' TERM
      while kill -0 "$SRUN_PID" 2>/dev/null; do
        sleep 20 & nap=$!
        wait "$nap"
        kill -USR1 "$SRUN_PID" 2>/dev/null
      done
    ) &
    RESENDER=$!
  fi
}
on_usr1() {
  [ "$GOT_USR1" = 1 ] && return
  GOT_USR1=1
  echo "[vlbert] $(date -Is) received SIGUSR1: asking the trainers to checkpoint and stop, then requeueing"
  ask_trainers_to_stop
}
# TERM comes from Slurm itself, to every process of the job (scancel, preemption, the
# time limit); the trainers save and stop. It is never requeued here: a cancelled job
# stays cancelled (even when the cancel comes during a USR1 checkpoint), and Slurm
# requeues preempted jobs itself.
on_term() {
  [ "$GOT_TERM" = 1 ] && return
  GOT_TERM=1
  echo "[vlbert] $(date -Is) received SIGTERM: asking the trainers to checkpoint and stop (no requeue)"
  ask_trainers_to_stop
}
trap on_usr1 USR1
trap on_term TERM

# One srun task per GPU, each running tools/train.py with the torch.distributed
# variables taken from Slurm. Chosen over one `deepspeed`/`torchrun` launcher per
# node: Slurm starts, signals, accounts for and cleans up every trainer process
# itself, no ssh/pdsh or hostfile is needed, and --kill-on-bad-exit stops the whole
# step when one rank fails instead of leaving the others hanging in a collective.
# Every task sees all GPUs of its node and picks cuda:LOCAL_RANK (no per-task GPU
# binding, which would renumber the devices). --cpus-per-task is repeated because
# srun 22.05-23.02 no longer inherits it from sbatch.
# The wrapper ignores USR1 (`trap ''` survives exec): a signal that arrives while
# Python is still importing would otherwise kill the trainer, and one that arrives
# after the trainer restored its handlers at exit would kill it mid-teardown. The
# trainer installs its own handler for the training loop.
# shellcheck disable=SC2016  # expanded by the task's shell
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --ntasks="$NTASKS" \
  bash -c 'trap "" USR1
           export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
           echo "[vlbert] rank $RANK/$WORLD_SIZE local_rank $LOCAL_RANK on node $SLURMD_NODENAME ($(hostname)) pid $$"
           exec "$@"' vlbert-task \
  "$VLBERT_PYTHON" "$ENTRY" --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} &
SRUN_PID=$!
if [ "$GOT_USR1" = 1 ] || [ "$GOT_TERM" = 1 ]; then ask_trainers_to_stop; fi  # signalled while starting

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting
# until srun is gone, then collect its own exit status.
while kill -0 "$SRUN_PID" 2>/dev/null; do
  wait "$SRUN_PID"
done
wait "$SRUN_PID"
STATUS=$?
if [ -n "$RESENDER" ]; then kill "$RESENDER" 2>/dev/null; wait "$RESENDER" 2>/dev/null; fi
echo "[vlbert] $(date -Is) trainers exited with status $STATUS"

if [ "$GOT_USR1" = 1 ] && [ "$GOT_TERM" = 0 ] && [ "$STATUS" = 0 ]; then
  echo "[vlbert] requeueing job $SLURM_JOB_ID: it resumes from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  # Slurm clears a dependency once it is met: ask for singleton again for the requeued start
  # (refused while the job is not pending yet; the output folder's lease still holds then).
  scontrol update JobId="$SLURM_JOB_ID" Dependency=singleton 2>/dev/null ||
    echo "[vlbert] (could not set Dependency=singleton on the requeued job; the output folder's lease guards it)"
  exit 0
fi
exit "$STATUS"
