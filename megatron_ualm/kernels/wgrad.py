"""Weight gradients accumulated straight into megatron's fp32 ``main_grad`` buffers.

Without fusion every linear layer's backward writes its weight gradient as a bf16 tensor,
and DDP's hook then adds it into the parameter's fp32 ``main_grad`` (read 2 + read 4 +
write 4 bytes per element, plus the bf16 write): about 22 GB per step for a 1.5B model,
~7 ms on an H200. megatron-core avoids this with ``gradient_accumulation_fusion``, which
calls ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`` from apex (or TE). Neither
is installable here, so this module provides the same two functions on top of PyTorch:

* CUDA, bf16/fp16 inputs, fp32 ``main_grad``: one cuBLAS GEMM with a float32 output that
  accumulates into ``main_grad`` in place (``torch.addmm(..., out_dtype=torch.float32,
  out=main_grad)``), so the bf16 weight gradient never exists;
* anywhere else (CPU, fp32 training, or the kernels switched off: ``kernels.use_kernels``,
  which for this cuBLAS path does not ask for Triton): ``main_grad.addmm_`` in ``main_grad``'s
  dtype, the reference.

``install()`` registers them where megatron's linear layers look for the apex module; it
must run before the layers are built (they check at construction). The trainer and the step
benchmark turn the fusion on (``transformer_config_from(..., wgrad_fusion=True)``) only for
models wrapped in megatron's DDP, which gives every trainable weight its ``main_grad``.
"""
from __future__ import annotations

import sys
import types

import torch

from megatron_ualm import kernels

_HALF = (torch.bfloat16, torch.float16)


def _accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input (both 2-D: [tokens, out] and [tokens, in])."""
    a, b = grad_output.t(), total_input
    if (kernels.use_kernels(main_grad, needs_triton=False) and main_grad.dtype == torch.float32
            and a.dtype in _HALF and b.dtype == a.dtype):
        _accumulate_in_gemm(a, b, main_grad)
    else:
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


def _accumulate_in_gemm(a: torch.Tensor, b: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (fp32) += a @ b (half precision) in one GEMM with a float32 output."""
    torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`` contract."""
    _accumulate(total_input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's ``wgrad_gemm_accum_fp16`` contract (half-precision ``main_grad``)."""
    _accumulate(total_input, grad_output, main_grad)


MODULE_NAME = "fused_weight_gradient_mlp_cuda"


def install() -> None:
    """Make megatron's linear layers use the functions above for ``gradient_accumulation_fusion``
    (idempotent; a real apex/TE module, if importable, is left in place)."""
    from megatron.core.tensor_parallel import layers
    if getattr(layers, "_grad_accum_fusion_available", False) and hasattr(layers, MODULE_NAME):
        return
    module = sys.modules.get(MODULE_NAME)
    if module is None:
        module = types.ModuleType(MODULE_NAME, __doc__.split("\n\n")[0])
        module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
        module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
        sys.modules[MODULE_NAME] = module
    layers.fused_weight_gradient_mlp_cuda = module
    layers._grad_accum_fusion_available = True
