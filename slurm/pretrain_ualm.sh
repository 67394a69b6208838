#!/usr/bin/env bash
# Multi-node UALM pretraining under Slurm.
#
#   sbatch slurm/pretrain_ualm.sh                       # defaults below
#   sbatch --nodes=16 slurm/pretrain_ualm.sh            # any node count
#   CONFIG=examples/qwen2.5-7b.yaml OVERRIDES="training.train_iters=1000" sbatch slurm/pretrain_ualm.sh
#   DRY_RUN=1 NNODES=4 bash slurm/pretrain_ualm.sh      # print the exact commands, run nothing
#
# Launch modes (LAUNCHER):
#   srun     (default) one Slurm task per GPU; ranks come from SLURM_PROCID/SLURM_LOCALID.
#   torchrun one Slurm task per node running torchrun with a c10d rendezvous on the first node.
#            The torchrun agent ignores SIGUSR1 (its workers get it from Slurm and save); on
#            SIGTERM it stops its workers itself (SIGTERM, then SIGKILL after ~30 s), so use
#            the USR1 warning for large checkpoints.
# CPU nodes (no GPUs): sbatch --gpus-per-node=0 --cpus-per-task=1 ... with GPUS_PER_NODE set to
# the number of processes per node and OVERRIDES="parallel.device=cpu ..." (gloo).
# Preemption: Slurm sends SIGUSR1 (--signal) ahead of the time limit; every rank saves a
# checkpoint and exits with REQUEUE_EXIT_CODE, and this script then requeues the job. torchrun
# turns its workers' exit code into 1, so rank 0 also writes REQUEUE_MARKER, which this script
# reads. On restart the trainer resumes from the newest complete checkpoint in the experiment
# dir. `scancel --signal=USR1 --full` (which also reaches this batch shell) works the same way.
# --kill-on-bad-exit=0: every rank exits 42 after the preemption save; killing the others on
# the first such exit could turn 42 into another code and lose the requeue. A crashed rank
# still ends the job through the NCCL timeout.
#
#SBATCH --job-name=ualm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG="${CONFIG:-examples/qwen2.5-1.5b.yaml}"
OVERRIDES="${OVERRIDES:-}"
LAUNCHER="${LAUNCHER:-srun}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
MASTER_PORT="${MASTER_PORT:-29500}"
REQUEUE_EXIT_CODE="${REQUEUE_EXIT_CODE:-42}"   # must match megatron_ualm.training.signals
PYTHON="${PYTHON:-python}"
# Container (pyxis/enroot): leave CONTAINER_IMAGE empty to run on the host environment.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"
CONTAINER_WORKDIR="${CONTAINER_WORKDIR:-$PWD}"
DRY_RUN="${DRY_RUN:-0}"

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
  MASTER_ADDR="${MASTER_ADDR:-localhost}"
fi
JOB_ID="${SLURM_JOB_ID:-dryrun}"
LOG_DIR="${LOG_DIR:-logs}"
mkdir -p "$LOG_DIR"
# Written by rank 0 when it exits for requeue (megatron_ualm.training.signals); one per attempt.
export UALM_REQUEUE_MARKER="$LOG_DIR/.requeue-$JOB_ID-${SLURM_RESTART_COUNT:-0}"
rm -f "$UALM_REQUEUE_MARKER"
# The batch shell itself may get SIGUSR1 (scancel --full): wait for the trainer instead of dying.
trap 'echo "[ualm] batch shell got SIGUSR1; waiting for the trainer to save"' USR1

export CUDA_DEVICE_MAX_CONNECTIONS=1   # keeps TP communication ahead of compute kernels
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONUNBUFFERED=1

container_args=()
if [[ -n "$CONTAINER_IMAGE" ]]; then
  container_args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$CONTAINER_WORKDIR")
  [[ -n "$CONTAINER_MOUNTS" ]] && container_args+=(--container-mounts="$CONTAINER_MOUNTS")
fi

read -r -a override_args <<< "$OVERRIDES"
train_args=(-m megatron_ualm.train --config "$CONFIG" "${override_args[@]}")

if [[ "$LAUNCHER" == "srun" ]]; then
  # One task per GPU: the trainer reads RANK/WORLD_SIZE/LOCAL_RANK from the SLURM_* variables.
  # --ntasks explicitly: srun would otherwise take the allocation's SLURM_NTASKS.
  launch=(srun --nodes="$NNODES" --ntasks="$((NNODES * GPUS_PER_NODE))" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=0
          --output="$LOG_DIR/%x-%j-rank%t.log" "${container_args[@]}"
          env MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" "$PYTHON" "${train_args[@]}")
elif [[ "$LAUNCHER" == "torchrun" ]]; then
  # One task per node. Slurm signals every process of the step, the workers included; the
  # agent ignores SIGUSR1 (an ignored signal stays ignored across exec) so that it waits for
  # its workers' preemption save instead of stopping them.
  launch=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0
          --output="$LOG_DIR/%x-%j-node%n.log" "${container_args[@]}"
          bash -c 'trap "" USR1; exec "$@"' torchrun
          "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
          --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID"
          "${train_args[@]}")
else
  echo "pretrain_ualm.sh: LAUNCHER must be srun or torchrun, got '$LAUNCHER'" >&2
  exit 2
fi

echo "[ualm] job $JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s), launcher $LAUNCHER, config $CONFIG"
printf '%q ' "${launch[@]}"; echo
if [[ "$DRY_RUN" == "1" ]]; then
  exit 0
fi

set +e
"${launch[@]}"
status=$?
set -e
if [[ ( "$status" -eq "$REQUEUE_EXIT_CODE" || -f "$UALM_REQUEUE_MARKER" ) && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "[ualm] checkpoint saved on preemption (launcher exit code $status); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
