"""``kernels/wgrad.py``: weight gradients accumulated into fp32 ``main_grad`` in the GEMM.

The whole path through megatron's linear layers and DDP (TP=1 and TP=2 + SP against the
unfused gradients) is ``test_model_parallel.test_weight_gradients_accumulated_in_the_gemm_match``.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ualm.kernels import wgrad as wgrad_fusion

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _operands(dtype, device="cpu", tokens=96, n_in=40, n_out=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n_in, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, n_out, generator=g).to(device=device, dtype=dtype)
    return x, dy


def test_accumulates_grad_output_t_times_input():
    x, dy = _operands(torch.float32)
    main = torch.full((24, 40), 0.5)
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
    want = 0.5 + 2 * (dy.double().t() @ x.double())
    torch.testing.assert_close(main.double(), want, atol=1e-4, rtol=1e-5)


def test_half_operands_into_fp32_main_grad_on_cpu():
    x, dy = _operands(torch.bfloat16)
    main = torch.zeros(24, 40)
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
    assert main.dtype == torch.float32
    torch.testing.assert_close(main, dy.float().t() @ x.float(), atol=1e-4, rtol=1e-5)


def test_install_registers_the_module_megatron_looks_for():
    from megatron.core.tensor_parallel import layers
    wgrad_fusion.install()
    wgrad_fusion.install()
    assert layers._grad_accum_fusion_available
    assert layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32 is wgrad_fusion.wgrad_gemm_accum_fp32


@pytest.mark.gpu
@gpu
def test_bf16_gemm_accumulates_in_fp32_in_place_on_gpu():
    """The cuBLAS path (float32 output aliased with main_grad) adds to what is there and keeps
    fp32 precision: its error is far below one bf16 rounding of the product."""
    x, dy = _operands(torch.bfloat16, "cuda", tokens=4096, n_in=1536, n_out=512)
    start = torch.randn(512, 1536, device="cuda")
    main = start.clone()
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
    wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
    exact = start.double() + 2 * (dy.double().t() @ x.double())
    err = (main.double() - exact).abs().max().item()
    bf16_err = ((dy.t() @ x).double() * 2 + start.double() - exact).abs().max().item()
    assert err < 1e-2 * max(bf16_err, 1e-6) + 1e-3, (err, bf16_err)
