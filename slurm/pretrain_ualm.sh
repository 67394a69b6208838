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
#            On the preemption signal torchrun stops its workers itself (SIGTERM, then SIGKILL
#            after its grace period), so a large checkpoint may not finish: prefer srun when
#            jobs are preempted.
# Preemption: Slurm sends SIGUSR1 (--signal) ahead of the time limit; the trainer saves a
# checkpoint and exits with REQUEUE_EXIT_CODE, and this script then requeues the job. On
# restart the trainer resumes from the newest complete checkpoint in the experiment dir.
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
  launch=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=0
          --output="$LOG_DIR/%x-%j-rank%t.log" "${container_args[@]}"
          env MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" "$PYTHON" "${train_args[@]}")
elif [[ "$LAUNCHER" == "torchrun" ]]; then
  # One task per node; torchrun forwards SIGUSR1 to its workers when told to handle it.
  launch=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0
          --output="$LOG_DIR/%x-%j-node%n.log" "${container_args[@]}"
          env "TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
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
if [[ "$status" -eq "$REQUEUE_EXIT_CODE" && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "[ualm] checkpoint saved on preemption; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
