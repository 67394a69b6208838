"""Faster paths for megatron's optimizer when neither apex nor TransformerEngine is installed.

Without them megatron-core (0.16 - 0.19) falls back to

* ``torch.optim.AdamW`` with its default implementation on CUDA (``foreach``: about ten
  passes over the float32 main parameters and states per step);
* ``local_multi_tensor_l2_norm`` for the gradient norm: one ``torch.norm`` per tensor and a
  ``torch.tensor(list_of_cuda_scalars)`` that synchronises with the device once per tensor;
* ``local_multi_tensor_scale`` for clipping: ``dst.copy_(src * scale)`` per tensor (a
  temporary and two passes).

``speed_up(optimizer)`` (called by ``providers.build_optimizer`` and the step benchmark):

* installs ``foreach_l2_norm`` / ``foreach_scale`` (``torch._foreach_norm``,
  ``torch._foreach_mul_``: the same values, no per-tensor synchronisation) in place of the two
  local fallbacks -- only where megatron uses the fallbacks (process-wide, idempotent);
* runs the inner torch Adam/AdamW with ``fused=True`` when all its parameters are CUDA tensors
  (one kernel per tensor group, same update rule). The flag is (re)applied by a step pre-hook,
  which also moves each parameter's ``step`` count to its device as the fused kernel needs
  (a checkpoint load may leave CPU ``step`` tensors, ``mcore_compat.load_optimizer_state``);
* copies the updated fp32 main parameters into the bf16 model weights with one
  ``torch._foreach_copy_`` instead of a Python loop of ``copy_`` launches;
* clips inside the fused Adam kernel (``use_clip_in_adam``): megatron reads the gradient
  norm on the host (``.item()``: the CPU waits for the whole backward) and then scales
  every gradient in a separate pass; instead the norm stays on the device and the fused
  kernel divides each gradient by ``max(1, (norm + 1e-6) / clip_grad)`` as it reads it --
  megatron's clip coefficient -- and skips the update when the norm is not finite. The
  step returns the norm as a 0-dim device tensor (``float()`` it when logging).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

from megatron_ualm.mcore_compat import begin_optimizer_step, grads_for_norm, has_separate_grad_norm_groups

log = logging.getLogger(__name__)

_MARK = "__ualm_fast_optimizer__"


# --- multi-tensor ops (megatron's apex signatures) ---------------------------------------------------
def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract: (total L2 norm as a [1] float32 tensor, None)."""
    tensors = [t for t in tensor_lists[0] if t.numel() > 0]
    if not tensors:
        device = tensor_lists[0][0].device if tensor_lists[0] else noop_flag.device
        return torch.zeros(1, dtype=torch.float32, device=device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract: ``dst = src * scale`` for each pair."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


setattr(foreach_l2_norm, _MARK, True)
setattr(foreach_scale, _MARK, True)


def install_foreach_multi_tensor_ops() -> list[str]:
    """Replace megatron's local (no apex/TE) multi-tensor fallbacks; returns what was replaced."""
    import megatron.core.utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer
    replaced = []
    targets = [(clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm, foreach_l2_norm),
               (clip_grads, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale),
               (moptimizer, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, foreach_scale)]
    for module, name, fallback, replacement in targets:
        current = getattr(module, name, None)
        if current is fallback:
            setattr(module, name, replacement)
            replaced.append(f"{module.__name__}.{name}")
    return replaced


# --- fused torch Adam -----------------------------------------------------------------------------------
def _torch_adams(optimizer) -> Iterable[torch.optim.Optimizer]:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def _all_cuda(opt: torch.optim.Optimizer) -> bool:
    params = [p for g in opt.param_groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def _fused_pre_hook(opt, args, kwargs):
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, False
        for p in group["params"]:
            state = opt.state.get(p)
            if state:
                step = state.get("step")
                if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                    state["step"] = step.detach().to(device=p.device, dtype=torch.float32).clone()
    return None


def use_fused_adam(optimizer) -> int:
    """Switch every inner torch Adam/AdamW whose parameters are all on CUDA to its fused
    implementation (through a step pre-hook, see the module docstring). Returns how many."""
    count = 0
    for opt in _torch_adams(optimizer):
        if not _all_cuda(opt) or getattr(opt, _MARK, False):
            continue
        if any(g.get("differentiable") or g.get("capturable") for g in opt.param_groups):
            continue
        opt.register_step_pre_hook(_fused_pre_hook)
        setattr(opt, _MARK, True)
        count += 1
    return count


# --- main (fp32) -> model (bf16) parameter copy ------------------------------------------------------
def _foreach_copy_main_params_to_model_params(self) -> None:
    """``DistributedOptimizer._copy_main_params_to_model_params`` for bf16/fp16 model weights
    without FSDP, FP8 or the precision-aware optimizer: the same copies (each fp32 main shard
    into its slice of the bucket's parameter buffer) as one ``torch._foreach_copy_`` instead
    of one ``copy_`` launch per tensor (~340 launches for a 1.5B model)."""
    dst, src = [], []
    pairs = ((self.shard_fp32_from_float16_groups, self.model_float16_groups),
             (self.shard_fp32_groups, self.model_fp32_groups))
    for shard_groups, model_groups in pairs:
        for shard_group, model_group in zip(shard_groups, model_groups):
            for shard_main_param, model_param in zip(shard_group, model_group):
                world_range = self._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                gbuf_index, _, bucket_id = self.model_param_gbuf_map[model_param]
                buffer = self.buffers[gbuf_index].buckets[bucket_id].param_data
                dst.append(buffer.view(-1)[world_range.start:world_range.end])
                src.append(shard_main_param)
    if dst:
        torch._foreach_copy_(dst, src)


def use_foreach_param_copy(optimizer) -> int:
    """Give each plain megatron DistributedOptimizer the foreach main -> model copy above."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    count = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(part) is not DistributedOptimizer or getattr(part, "is_stub_optimizer", False):
            continue
        cfg, ddp_cfg = part.config, part.ddp_config
        if (getattr(ddp_cfg, "use_megatron_fsdp", False) or getattr(cfg, "use_precision_aware_optimizer", False)
                or getattr(cfg, "reuse_grad_buf_for_mxfp8_param_ag", False) or getattr(cfg, "fp8_recipe", None)):
            continue
        part._copy_main_params_to_model_params = _foreach_copy_main_params_to_model_params.__get__(part)
        count += 1
    return count


# --- clipping inside the fused Adam kernel ------------------------------------------------------------
def device_grad_norm(grads: list, group, device: torch.device) -> torch.Tensor:
    """The L2 norm of ``grads`` over ``group`` (summed squares all-reduced) as a 0-dim float32
    tensor on ``device``: megatron's ``get_grad_norm_fp32`` without reading it on the host."""
    grads = [g for g in grads if g.numel() > 0]
    if grads:
        squares = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares, op=torch.distributed.ReduceOp.SUM, group=group)
    return squares.sqrt()


def _clip_in_adam(part, clip_grad: float) -> torch.Tensor:
    """Gradient norm and clip divisor of a mixed-precision optimizer ``part``, on the device;
    its fused inner Adam applies the divisor (and skips the update on a non-finite norm)."""
    params = part.get_parameters()
    grads = grads_for_norm(part) if params else []
    device = params[0].device if params else torch.device("cuda", torch.cuda.current_device())
    norm = device_grad_norm(grads, part.get_grad_stats_parallel_group(), device)
    # megatron: coeff = clip / (norm + 1e-6), grads *= coeff when coeff < 1
    part.optimizer.grad_scale = torch.clamp((norm + 1.0e-6) / clip_grad, min=1.0)
    part.optimizer.found_inf = (~torch.isfinite(norm)).float()
    return norm


@torch.no_grad()
def _step_with_clip_in_adam(self):
    """megatron's optimizer ``step`` (plain or chained with one part) with the clip on the
    device: prepare grads, norm + clip divisor, optional zero count, the update."""
    part = getattr(self, "chained_optimizers", [self])[0]
    begin_optimizer_step(self)
    if self.prepare_grads():
        return False, None, None
    grad_norm = None
    if part.config.clip_grad > 0.0:
        grad_norm = _clip_in_adam(part, part.config.clip_grad)
    else:
        part.optimizer.grad_scale = part.optimizer.found_inf = None
    num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
    return self.step_with_ready_grads(), grad_norm, num_zeros


def use_clip_in_adam(optimizer) -> int:
    """Give a megatron mixed-precision optimizer (plain, or chained with a single part) whose
    inner torch Adam runs fused (``use_fused_adam``) the device-side clip above. Several
    chained parts keep megatron's path. Returns how many optimizers changed (0 or 1)."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(parts) != 1:
        return 0
    part = parts[0]
    if (not isinstance(part, MixedPrecisionOptimizer) or getattr(part, "is_stub_optimizer", False)
            or not getattr(getattr(part, "optimizer", None), _MARK, False)
            or getattr(part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            or has_separate_grad_norm_groups(part)):
        return 0
    optimizer.step = _step_with_clip_in_adam.__get__(optimizer)
    return 1


def speed_up(optimizer, clip_in_adam: bool = True) -> dict:
    """All of the above (``clip_in_adam=False``: megatron's clip); returns what was done."""
    done = {"multi_tensor_ops": install_foreach_multi_tensor_ops(), "fused_adam": use_fused_adam(optimizer),
            "foreach_param_copy": use_foreach_param_copy(optimizer)}
    done["clip_in_adam"] = use_clip_in_adam(optimizer) if clip_in_adam else 0
    log.info("optimizer speed-ups: %s", done)
    return done
