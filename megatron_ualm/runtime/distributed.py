"""Start and stop torch.distributed + megatron-core parallel state, on GPUs or on CPU.

One code path for both: ``init_runtime`` picks NCCL + CUDA when a GPU is available (unless
``device="cpu"``) and gloo + CPU otherwise; on CPU it applies
:func:`megatron_ualm.runtime.cpu_compat.apply_cpu_compat` so that unmodified megatron-core
(model, pipeline schedules, DDP, distributed optimizer) runs there too.

Launching: under ``torchrun`` the usual variables are read (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). A plain ``python script.py`` with none of them set is a world of 1.

Parallel layout: megatron's default order "tp-cp-ep-dp-pp" — consecutive ranks share a
tensor-parallel group, pipeline stages are the outermost split. ``world_size`` must be a
multiple of ``tp * pp * cp``; the quotient is the data-parallel size.

The only global state is what torch.distributed and megatron's ``parallel_state`` already
hold; :class:`Runtime` is an immutable snapshot of it for convenient passing around.
"""
from __future__ import annotations

import datetime
import os
import random
import socket
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_compat, is_cpu_compat_applied

__all__ = ["Runtime", "init_runtime", "shutdown_runtime", "set_cuda_device_max_connections"]

#: Added per pipeline stage to the seed (as Megatron-LM does) so stages, which build
#: different layers, do not draw identical initial weights. Data-parallel replicas share
#: the seed: mcore DDP does not broadcast parameters, identical init keeps replicas in sync.
PIPELINE_SEED_STRIDE = 100


@dataclass(frozen=True)
class Runtime:
    """Immutable description of this process's place in the parallel layout.

    Sizes multiply: ``world_size == tp_size * pp_size * cp_size * dp_size``.
    Ranks are this process's coordinate along each axis (0-based).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # cuda:<local_rank> or cpu; put model and batches here
    backend: str  # "nccl" or "gloo"
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    vpp_size: Optional[int]  # virtual pipeline chunks per stage (None: not interleaved)
    cp_size: int
    cp_rank: int
    dp_size: int
    dp_rank: int
    seed: int  # the seed given to init_runtime (per-stage offsets are applied internally)

    @property
    def is_first_stage(self) -> bool:
        """Physical first pipeline stage (holds the embedding; with VPP, chunk 0 of it)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Physical last pipeline stage (holds the head + loss; with VPP, its last chunk)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def set_cuda_device_max_connections(tensor_parallel: int, context_parallel: int = 1) -> None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` when TP (or CP) > 1 on GPU.

    Why: with one hardware work queue the GPU launches kernels in issue order, so a TP/CP
    communication kernel issued before a GEMM is scheduled before it — what megatron's
    (and Transformer Engine's) compute/communication overlap and sequence parallelism rely
    on. The variable is read when the CUDA context is created, so this must run before the
    first CUDA call of the process; if CUDA is already initialised we only warn.
    Does nothing for TP = CP = 1 or when the user already set the variable.
    """
    if tensor_parallel <= 1 and context_parallel <= 1:
        return
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        if os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] != "1":
            warnings.warn(
                "CUDA_DEVICE_MAX_CONNECTIONS is set to "
                f"{os.environ['CUDA_DEVICE_MAX_CONNECTIONS']!r}; megatron expects 1 with "
                "tensor/context parallelism (communication/compute overlap ordering).",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    if torch.cuda.is_initialized():
        warnings.warn(
            "CUDA was initialised before init_runtime, so CUDA_DEVICE_MAX_CONNECTIONS=1 cannot "
            "take effect; export it in the launch environment for TP/CP > 1.",
            RuntimeWarning,
            stacklevel=2,
        )
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def _env_from_slurm() -> None:
    """`srun` with one task per GPU (slurm/pretrain_ualm.sh, LAUNCHER=srun) sets SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID instead of torchrun's variables; translate them. A
    torchrun launch (RANK already set) is left alone."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _choose_device(device: Optional[str], local_rank: int) -> torch.device:
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda'; got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("init_runtime(device='cuda') but torch.cuda.is_available() is False")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _validate_layout(world_size: int, tp: int, pp: int, vpp: Optional[int], cp: int) -> None:
    for name, value in (("tensor_parallel", tp), ("pipeline_parallel", pp),
                        ("context_parallel", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tensor_parallel ({tp}) x "
            f"pipeline_parallel ({pp}) x context_parallel ({cp}) = {model_parallel}; "
            f"the data-parallel size must be a whole number"
        )
    if vpp is not None:
        if not isinstance(vpp, int) or vpp < 1:
            raise ValueError(f"virtual_pipeline_parallel must be None or a positive int; got {vpp!r}")
        if vpp > 1 and pp < 2:
            raise ValueError("virtual_pipeline_parallel > 1 needs pipeline_parallel >= 2")


def init_runtime(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    context_parallel: int = 1,
    seed: int = 1234,
    device: Optional[str] = None,
    timeout_minutes: float = 10.0,
) -> Runtime:
    """Initialise torch.distributed and megatron-core's parallel state; seed every RNG.

    Args:
        tensor_parallel, pipeline_parallel, context_parallel: megatron TP/PP/CP sizes.
        virtual_pipeline_parallel: model chunks per pipeline stage (interleaved 1F1B) or None.
        seed: base seed. Python/numpy/torch get ``seed + 100 * pp_rank``; megatron's
            tensor-parallel RNG tracker is seeded with the same value (its TP streams add
            ``2718 + tp_rank``).
        device: None = CUDA if available else CPU; "cpu" forces CPU + gloo (and applies the
            process-wide CPU compatibility patches); "cuda" requires a GPU.
        timeout_minutes: collective timeout of every process group.

    Returns:
        A :class:`Runtime` snapshot. Call :func:`shutdown_runtime` to tear down (e.g. between
        tests in one process).

    Raises:
        ValueError: bad sizes, including ``world_size`` not divisible by ``tp * pp * cp``.
        RuntimeError: already initialised, or multi-process launch without MASTER_ADDR/PORT.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron model parallel state is already initialised; call shutdown_runtime() first"
        )

    _env_from_slurm()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0 if world_size == 1 else rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world_size}")
    _validate_layout(world_size, tensor_parallel, pipeline_parallel,
                     virtual_pipeline_parallel, context_parallel)

    dev = _choose_device(device, local_rank)
    if dev.type == "cuda" and is_cpu_compat_applied():
        raise RuntimeError(
            "this process already ran on CPU (apply_cpu_compat redirected CUDA to CPU "
            "process-wide); start a fresh process for a CUDA runtime, or pass device='cpu'"
        )
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dev.type == "cuda":
        set_cuda_device_max_connections(tensor_parallel, context_parallel)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        apply_cpu_compat()
        backend = "gloo"

    if dist.is_initialized():
        # Reuse a group someone else created, but it must describe the same world.
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialised with rank {dist.get_rank()} / world "
                f"{dist.get_world_size()}, but the environment says {rank} / {world_size}"
            )
        backend = dist.get_backend()
    else:
        addr = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if world_size > 1 and (not addr or not port):
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with "
                "torchrun (or set them) so the processes can find each other"
            )
        addr = addr or "127.0.0.1"
        port = port or str(_free_port())
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        distributed_timeout_minutes=max(1, int(round(timeout_minutes))),
    )

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + PIPELINE_SEED_STRIDE * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)

    return Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        backend=str(backend),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pp_rank=pp_rank,
        vpp_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        seed=seed,
    )


def shutdown_runtime() -> None:
    """Destroy megatron's parallel state and the default process group (safe to repeat).

    The CPU compatibility patches stay applied (they are process-wide and idempotent).
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
