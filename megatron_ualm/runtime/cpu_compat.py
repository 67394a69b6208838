"""Run megatron-core on CPU (gloo) by redirecting its CUDA assumptions at runtime.

Why: megatron-core (0.16 - 0.19) is written for GPUs. Even with ``use_cpu_initialization``
and a gloo process group it still

* uses ``torch.cuda.current_device()`` as the device of new tensors (model, p2p, DDP buffers);
* keeps the tensor-parallel RNG tracker in the *CUDA* generator
  (``tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state``,
  ``torch.cuda.get_rng_state/set_rng_state/manual_seed``) and forks it unconditionally
  (weight init, dropout, recompute), even with dropout 0;
* creates scalars with ``device="cuda"`` in the pipeline schedules, grad clipping, the
  optimizers and ``tensor_parallel.data``; moves tensors with ``.cuda()``;
* calls ``torch.cuda.synchronize()`` and (0.19) ``torch.cuda.current_stream().wait_*``;
* checks ``param.type()`` / ``grad.type()`` against ``'torch.cuda.FloatTensor'`` etc.
  (optimizer, distributed optimizer, grad clipping).

This module fixes all of that *without editing megatron's files*, so the model and trainer
run the same code on a laptop / in CI as on GPUs. It is applied by
``megatron_ualm.runtime.init_runtime`` when (and only when) the runtime device is CPU.

Semantics after :func:`apply_cpu_compat` (process-wide, irreversible, idempotent):

* "the CUDA device" *is* the CPU: ``torch.cuda.current_device()`` returns
  ``torch.device("cpu")``; factory calls (``torch.zeros/ones/empty/full/tensor/arange``)
  asking for a CUDA device get CPU; ``Tensor.cuda()`` is ``Tensor.to("cpu")``;
  ``torch.cuda.synchronize()`` is a no-op; ``current_stream()/default_stream()`` return an
  inert stream whose waits are no-ops (CPU ops are synchronous).
* "the CUDA generator" *is* the CPU default generator (``torch.default_generator``): the
  tracker's named states (``model-parallel-rng``, ``data-parallel-rng``, ...) are CPU
  generator states, so forks give tensor-parallel ranks distinct, reproducible streams and
  the default stream resumes where it left off — exactly the GPU semantics.
  ``torch.cuda.manual_seed_all`` is deliberately left alone: ``torch.manual_seed`` calls it,
  so aliasing it to ``torch.manual_seed`` would recurse forever.
* ``Tensor.type()`` with no argument, *called from a ``megatron.*`` module*, reports the CUDA
  type name (``'torch.cuda.FloatTensor'`` for a CPU float32 tensor); every other caller still
  sees the truth. ``Tensor.type('torch.cuda.XTensor')`` converts to the CPU type.
* megatron's fork logs "CPU RNG state changed within GPU RNG context" whenever a fork draws
  random numbers; on CPU that is the intended behaviour, so that one message is filtered.

Fails loudly: every target is resolved before anything is patched; a missing target (a
megatron-core or torch upgrade renamed/removed it) raises :class:`CpuCompatError` naming the
megatron-core version, the symbol and what the patch was for.

Do not use on a process that also runs real CUDA work: after patching, CUDA requests go to CPU.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from megatron_ualm.mcore_compat import megatron_core_version

__all__ = [
    "CpuCompatError",
    "SUPPORTED_MEGATRON_CORE",
    "apply_cpu_compat",
    "is_cpu_compat_applied",
    "check_patch_targets",
    "patched_symbols",
]

#: megatron-core versions this module was written against: [low, high).
SUPPORTED_MEGATRON_CORE = ((0, 16), (0, 20))

# Attribute set on every replacement so that "is it applied?" is read off the targets
# themselves (no module-level flag to get out of sync).
_MARK = "__ualm_cpu_compat__"
_CPU = torch.device("cpu")
_RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class CpuCompatError(RuntimeError):
    """A megatron-core / torch symbol that the CPU compatibility layer patches is missing."""


# ---------------------------------------------------------------------------------------
# Replacements. Each ``_make_*`` takes the original object and returns the replacement.
# ---------------------------------------------------------------------------------------
def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:1", torch.device("cuda", i) and bare ints (torch: int = CUDA)."""
    if device is None:
        return False
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _make_factory(original: Callable) -> Callable:
    """``torch.zeros(..., device="cuda")`` -> the same call on CPU (pin_memory dropped)."""

    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)  # pinning needs an accelerator; meaningless here
        return original(*args, **kwargs)

    return factory


def _make_current_device(original: Callable) -> Callable:
    def current_device():
        """CPU stands in for "the current CUDA device" (used as ``device=`` for new tensors)."""
        return _CPU

    return current_device


def _make_synchronize(original: Callable) -> Callable:
    def synchronize(device=None):
        """CPU kernels are synchronous: nothing to wait for."""
        return None

    return synchronize


class _CpuStream:
    """Inert stand-in for ``torch.cuda.Stream``: CPU work is already ordered, waits are no-ops."""

    device = _CPU

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _make_stream_getter(original: Callable) -> Callable:
    def stream_getter(device=None):
        return _CPU_STREAM

    return stream_getter


def _make_get_rng_state(original: Callable) -> Callable:
    def get_rng_state(device="cuda"):
        """State of the CPU default generator (stands in for the CUDA generator)."""
        return torch.default_generator.get_state()

    return get_rng_state


def _make_set_rng_state(original: Callable) -> Callable:
    def set_rng_state(new_state, device="cuda"):
        torch.default_generator.set_state(new_state)

    return set_rng_state


def _make_manual_seed(original: Callable) -> Callable:
    def manual_seed(seed):
        # Seed the generator directly; torch.manual_seed would call torch.cuda.manual_seed_all.
        torch.default_generator.manual_seed(int(seed))

    return manual_seed


def _make_mcore_get_cuda_rng_state(original: Callable) -> Callable:
    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        """megatron's tracker state = CPU generator state (a uint8 tensor; always a copy)."""
        return torch.default_generator.get_state()

    return _get_cuda_rng_state


def _make_mcore_set_cuda_rng_state(original: Callable) -> Callable:
    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        # The original defers through torch.cuda._lazy_call, which never runs without CUDA.
        torch.default_generator.set_state(new_state)

    return _set_cuda_rng_state


def _make_tensor_cuda(original: Callable) -> Callable:
    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        """``t.cuda()`` -> ``t`` on CPU (no copy when it already is)."""
        return self.to(_CPU, non_blocking=non_blocking, memory_format=memory_format)

    return cuda


def _make_tensor_type(original: Callable) -> Callable:
    def type(self, dtype=None, non_blocking=False, **kwargs):  # noqa: A001 - mirrors Tensor.type
        """CUDA type names for megatron's dtype checks; the truth for everyone else."""
        if dtype is None and not kwargs:
            name = original(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.") and name.startswith("torch.") and not self.is_cuda:
                return "torch.cuda." + name[len("torch."):]
            return name
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + dtype[len("torch.cuda."):]
        return original(self, dtype, non_blocking, **kwargs)

    return type


class _DropRngForkWarning(logging.Filter):
    """Drops megatron's "CPU RNG state changed within GPU RNG context" (expected on CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_FORK_WARNING not in record.getMessage()


# ---------------------------------------------------------------------------------------
# The patch table.
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Patch:
    module: str  # importable module holding the target
    attr: str  # attribute path inside it ("Tensor.type" = getattr(getattr(m, "Tensor"), "type"))
    make: Callable[[Any], Any]  # original -> replacement
    why: str  # which megatron-core code relies on it

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.attr}"


_FACTORY_NAMES = ("zeros", "ones", "empty", "full", "tensor", "arange")

_PATCHES: Tuple[_Patch, ...] = (
    _Patch("torch.cuda", "current_device", _make_current_device,
           "used as device= for new tensors (utils, tensor_parallel, p2p, DDP buffers, RoPE)"),
    _Patch("torch.cuda", "synchronize", _make_synchronize,
           "pipeline p2p communication and parallel_state call it"),
    _Patch("torch.cuda", "current_stream", _make_stream_getter,
           "grad buffers wait on the current stream (megatron-core 0.19)"),
    _Patch("torch.cuda", "default_stream", _make_stream_getter,
           "grad buffers wait on the default stream"),
    _Patch("torch.cuda", "get_rng_state", _make_get_rng_state,
           "CudaRNGStatesTracker.add and the rerun state machine read the CUDA RNG state"),
    _Patch("torch.cuda", "set_rng_state", _make_set_rng_state,
           "the rerun state machine restores the CUDA RNG state"),
    _Patch("torch.cuda", "manual_seed", _make_manual_seed,
           "model_parallel_cuda_manual_seed and CudaRNGStatesTracker.add seed the CUDA generator"),
    _Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
           _make_mcore_get_cuda_rng_state,
           "CudaRNGStatesTracker.fork and activation recompute save the CUDA RNG state"),
    _Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
           _make_mcore_set_cuda_rng_state,
           "CudaRNGStatesTracker.fork and activation recompute restore the CUDA RNG state"),
    _Patch("torch", "Tensor.cuda", _make_tensor_cuda,
           "tensor_parallel.data, optimizer state loading, grad scaler, embedding sync call .cuda()"),
    _Patch("torch", "Tensor.type", _make_tensor_type,
           "optimizer / distributed optimizer / grad clipping compare type() with torch.cuda.*Tensor"),
) + tuple(
    _Patch("torch", name, _make_factory,
           f'schedules, grad clipping, optimizers, data broadcast call torch.{name}(device="cuda")')
    for name in _FACTORY_NAMES
)


def patched_symbols() -> List[str]:
    """Dotted names of every symbol :func:`apply_cpu_compat` replaces (for tests and logs)."""
    return [p.symbol for p in _PATCHES]


def _resolve(patch: _Patch) -> Tuple[Any, str, Any]:
    """Return (owner object, final attribute name, current value) or raise CpuCompatError."""
    try:
        owner = importlib.import_module(patch.module)
    except ImportError as exc:
        raise CpuCompatError(_missing_message(patch, f"module import failed: {exc}")) from exc
    *parents, leaf = patch.attr.split(".")
    for name in parents:
        if not hasattr(owner, name):
            raise CpuCompatError(_missing_message(patch, f"`{name}` not found"))
        owner = getattr(owner, name)
    if not hasattr(owner, leaf):
        raise CpuCompatError(_missing_message(patch, f"`{leaf}` not found"))
    return owner, leaf, getattr(owner, leaf)


def _missing_message(patch: _Patch, detail: str) -> str:
    return (
        f"megatron_ualm CPU compatibility: cannot patch `{patch.symbol}` "
        f"(megatron-core {megatron_core_version()}, torch {torch.__version__}): {detail}. "
        f"It is patched because {patch.why}. A megatron-core/torch upgrade probably renamed or "
        f"removed it; update megatron_ualm/runtime/cpu_compat.py "
        f"(supported megatron-core: >={_fmt(SUPPORTED_MEGATRON_CORE[0])},"
        f"<{_fmt(SUPPORTED_MEGATRON_CORE[1])})."
    )


def _fmt(v: Tuple[int, int]) -> str:
    return ".".join(map(str, v))


def _is_ours(obj: Any) -> bool:
    return bool(getattr(obj, _MARK, False))


def check_patch_targets() -> Dict[str, bool]:
    """Resolve every target; raise :class:`CpuCompatError` if one is missing.

    Returns ``{symbol: already_patched}``. Cheap, patches nothing: safe to call anywhere
    (e.g. in a test that guards against megatron-core upgrades).
    """
    return {p.symbol: _is_ours(_resolve(p)[2]) for p in _PATCHES}


def _warn_if_unsupported_version() -> None:
    version = megatron_core_version()
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return
    low, high = SUPPORTED_MEGATRON_CORE
    if not (low <= parts < high):
        warnings.warn(
            f"megatron_ualm CPU compatibility was written for megatron-core >={_fmt(low)},"
            f"<{_fmt(high)}; found {version}. Patch targets still exist, but behaviour is untested.",
            RuntimeWarning,
            stacklevel=3,
        )


def apply_cpu_compat() -> None:
    """Redirect megatron-core's CUDA assumptions to the CPU (process-wide; idempotent).

    All targets are resolved first, so either every patch is applied or none is.
    Raises:
        CpuCompatError: a target vanished (message names the symbol and megatron-core version).
    """
    import megatron.core.tensor_parallel.random  # noqa: F401 - make sure the module is loaded

    resolved = [(p, *_resolve(p)) for p in _PATCHES]
    _warn_if_unsupported_version()
    # ``with torch.device(...)`` (used by transformers' from_pretrained to build on "meta")
    # recognises factory functions by identity in a cached set. Fill that cache with the real
    # factories before they are wrapped: our wrapper calls them, so the device context still
    # applies; a cache built later would hold the wrappers and the context would miss the
    # inner call (transformers then leaves its RoPE buffers uninitialised).
    from torch.utils import _device
    _device._device_constructors()
    for patch, owner, leaf, current in resolved:
        if _is_ours(current):
            continue
        replacement = patch.make(current)
        setattr(replacement, _MARK, True)
        replacement.__wrapped__ = current
        replacement.__doc__ = replacement.__doc__ or f"CPU stand-in for {patch.symbol}."
        setattr(owner, leaf, replacement)

    fork_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    if not any(isinstance(f, _DropRngForkWarning) for f in fork_logger.filters):
        fork_logger.addFilter(_DropRngForkWarning())


def is_cpu_compat_applied() -> bool:
    """True when every target currently holds this module's replacement."""
    try:
        return all(check_patch_targets().values())
    except CpuCompatError:
        return False
