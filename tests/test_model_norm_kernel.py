"""RMSNorm kernels (``kernels/rmsnorm.py``): the Triton forward/backward against float64 autograd of
the eager ``rms_norm``.

CPU: ``fused_rms_norm`` is the eager function there; a PyTorch transcription of the kernels'
float32 math against float64 autograd; the kernels under Triton's interpreter where Triton is
installed. GPU (``gpu`` mark): the kernels against float64 autograd, bf16 and fp32, a float32
weight on bf16 input, a strided input, and the module with the kernels on and off.
"""
from __future__ import annotations


import pytest
import torch

from kernel_utils import run_under_triton_interpreter
from megatron_ualm.kernels import rmsnorm

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS = 1e-6


def _inputs(rows, hidden, dtype, wdtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    dy = torch.randn(rows, hidden, generator=g)
    return x.to(device, dtype), w.to(device, wdtype or dtype), dy.to(device, torch.promote_types(dtype, wdtype or dtype))


def _float64_reference(x, w, dy):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = rmsnorm.rms_norm(x64, w64, EPS)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad


def _kernel_math(x, w, dy):
    """The kernels' arithmetic in PyTorch (float32 inputs: the roundings to x's dtype vanish)."""
    x32, w32, dy32 = x.float(), w.float(), dy.float()
    rstd = 1.0 / torch.sqrt((x32 * x32).sum(-1, keepdim=True) / x.shape[-1] + EPS)
    xhat = x32 * rstd
    y = w32 * xhat
    g = dy32 * w32
    dx = rstd * (g - xhat * ((g * xhat).sum(-1, keepdim=True) / x.shape[-1]))
    dw = (dy32 * xhat).sum(0)
    return y, dx, dw


def test_fused_rms_norm_is_the_eager_function_on_cpu():
    x, w, dy = _inputs(5, 48, torch.float32)
    outs = []
    for f in (rmsnorm.fused_rms_norm, rmsnorm.rms_norm):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f(xl, wl, EPS)
        y.backward(dy)
        outs.append((y.detach(), xl.grad, wl.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_kernel_math_matches_autograd():
    x, w, dy = _inputs(7, 300, torch.float32)
    x[0] = 0.0  # an all-zero row: rstd = 1/sqrt(eps), finite
    got = _kernel_math(x, w, dy)
    want = _float64_reference(x, w, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-5)


_INTERPRETED = """
import torch
from megatron_ualm.kernels import rmsnorm
g = torch.Generator().manual_seed(0)
for rows, hidden in [(5, 48), (9, 100), (1, 7)]:
    x = torch.randn(rows, hidden, generator=g) * 3
    w = 1 + 0.5 * torch.randn(hidden, generator=g)
    dy = torch.randn(rows, hidden, generator=g)
    y, rstd = rmsnorm.rms_norm_forward(x, w, 1e-6)
    dx, dw = rmsnorm.rms_norm_backward(x, w, rstd, dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want = rmsnorm.rms_norm(x64, w64, 1e-6)
    want.backward(dy.double())
    torch.testing.assert_close(y.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-5)
print("ok")
"""


def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_INTERPRETED, timeout=300)


# --- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,wdtype,tol", [(torch.bfloat16, torch.bfloat16, 2e-2), (torch.float32, torch.float32, 1e-5),
                                              (torch.bfloat16, torch.float32, 2e-2)])
@pytest.mark.parametrize("rows,hidden", [(8192, 1536), (37, 100)])
def test_triton_kernels_match_float64(dtype, wdtype, tol, rows, hidden):
    if not rmsnorm.HAVE_TRITON:
        pytest.skip("no triton")
    x, w, dy = _inputs(rows, hidden, dtype, wdtype, device="cuda")
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rmsnorm.fused_rms_norm(xl, wl, EPS)
    y.backward(dy)
    assert y.dtype == torch.promote_types(dtype, wdtype) and xl.grad.dtype == dtype and wl.grad.dtype == wdtype
    want_y, want_dx, want_dw = _float64_reference(x, w, dy)
    torch.testing.assert_close(y.double(), want_y, atol=tol, rtol=tol)
    torch.testing.assert_close(xl.grad.double(), want_dx, atol=tol, rtol=tol)
    # the weight gradient sums over all rows: compare relative to its scale
    scale = want_dw.abs().max()
    torch.testing.assert_close(wl.grad.double() / scale, want_dw / scale, atol=tol, rtol=tol)


@pytest.mark.gpu
@gpu
def test_triton_kernels_take_strided_input_and_match_the_module_off():
    from megatron_ualm import kernels
    from megatron_ualm.model.norm import RMSNorm
    if not rmsnorm.HAVE_TRITON:
        pytest.skip("no triton")
    x, w, dy = _inputs(6 * 4, 64, torch.float32, device="cuda")
    strided = x.view(6, 4, 64).transpose(0, 1).requires_grad_()  # [4, 6, 64], not contiguous
    module = RMSNorm(hidden_size=64, eps=EPS).cuda()
    with torch.no_grad():
        module.weight.copy_(w)
    results = []
    for enabled in (True, False):
        switch, kernels.ENABLED = kernels.ENABLED, enabled
        try:
            leaf = strided.detach().clone().requires_grad_()
            module.weight.grad = None
            y = module(leaf)
            y.backward(dy.view(4, 6, 64))
            results.append((y.detach(), leaf.grad, module.weight.grad.clone()))
        finally:
            kernels.ENABLED = switch
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
