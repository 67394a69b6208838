"""SwiGLU (``kernels/swiglu.py``): the Triton kernels and the MLP that uses them.

CPU: ``fused_swiglu`` is the reference there; a PyTorch transcription of the kernels' float32
math against autograd of the reference in float64; ``SwiGLUMLP`` against megatron's own MLP
forward; the kernels under Triton's interpreter where Triton is installed; the benchmark's
CPU exit. GPU (``gpu`` mark): the kernels against float64 autograd, forward and backward.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kernel_utils import run_under_triton_interpreter
from megatron_ualm.kernels import swiglu as sw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _float64_reference(y: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, dy) by autograd of the reference in float64."""
    y64 = y.detach().double().requires_grad_()
    out = sw.swiglu_reference(y64)
    out.backward(dout.double())
    return out.detach(), y64.grad


def _kernel_math(y: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' arithmetic, operation for operation, in PyTorch."""
    g, u = y.float().chunk(2, -1)
    d = dout.float()
    out = g * torch.sigmoid(g) * u
    s = torch.sigmoid(g)
    ds = d * s
    dg = ds * u * (1.0 + g * (1.0 - s))
    du = ds * g
    return out.to(y.dtype), torch.cat([dg, du], -1).to(y.dtype)


def _inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g) * 2
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    return y.to(device, dtype), dout.to(device, dtype)


# --- CPU ------------------------------------------------------------------------------------------------
def test_fused_swiglu_is_the_reference_on_cpu():
    for dtype in (torch.float32, torch.bfloat16):
        y, dout = _inputs((3, 5, 2 * 37), dtype)
        grads = []
        for f in (sw.fused_swiglu, sw.swiglu_reference):
            leaf = y.clone().requires_grad_()
            out = f(leaf)
            out.backward(dout)
            grads.append((out.detach(), leaf.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(sw.fused_swiglu(y), sw.swiglu_reference(y))


def test_kernel_math_matches_autograd():
    y, dout = _inputs((7, 2 * 300), torch.float32)
    y[0, :6] = torch.tensor([-100.0, -30.0, -1.2785, 0.0, 30.0, 100.0])  # saturated sigmoid, silu's minimum
    out, dy = _kernel_math(y, dout)
    want_out, want_dy = _float64_reference(y, dout)
    assert torch.isfinite(dy).all()
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy.double(), want_dy, atol=1e-5, rtol=1e-5)


def _mlp_against_megatron(enabled: bool) -> list:
    """In a child process (the CPU runtime patches torch.cuda process-wide): SwiGLUMLP and
    megatron's own MLP forward, outputs and gradients."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron_ualm import kernels
    from megatron_ualm.model.layer_spec import SwiGLUMLP
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from model_batches import tiny_model_cfg

    init_runtime(device="cpu", seed=11)
    kernels.ENABLED = enabled
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    mlp = SwiGLUMLP(transformer_config_from(cfg, None, "fp32"),
                    MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                    ffn_hidden_size=cfg.ffn_hidden_size)
    x = torch.randn(6, 2, cfg.hidden_size)
    dout = torch.randn(6, 2, cfg.hidden_size)
    results = []
    for forward in (mlp.forward, lambda h: MLP.forward(mlp, h)):
        mlp.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out, bias = forward(leaf)
        assert bias is None
        out.backward(dout)
        results.append([out.detach(), leaf.grad] + [p.grad for p in mlp.parameters()])
    shutdown_runtime()
    return results


@pytest.mark.parametrize("enabled", [True, False])
def test_swiglu_mlp_matches_megatrons_mlp(enabled):
    from dist_utils import run_distributed
    (results,) = run_distributed(_mlp_against_megatron, 1, enabled)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


_INTERPRETED = """
import torch
from megatron_ualm.kernels import swiglu as sw
torch.manual_seed(0)
for shape, block in [((3, 5, 74), 1024), ((4, 600), 128), ((2, 3, 2 * 256), 64)]:
    y = torch.randn(shape) * 2
    dout = torch.randn(*shape[:-1], shape[-1] // 2)
    out = sw.swiglu_forward(y, block=block)
    dy = sw.swiglu_backward(y, dout, block=block)
    y64 = y.double().requires_grad_()
    want = sw.swiglu_reference(y64)
    want.backward(dout.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy.double(), y64.grad, atol=1e-5, rtol=1e-5)
leaf = y.clone().requires_grad_()
sw._SwiGLU.apply(leaf).backward(dout)
torch.testing.assert_close(leaf.grad, dy)
print("ok")
"""


def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_INTERPRETED, timeout=300)


def test_benchmark_runs():
    spec = importlib.util.spec_from_file_location("swiglu_kernel", os.path.join(ROOT, "benchmarks", "swiglu_kernel.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--rows", "64", "--width", "256", "--iters", "2"]) == 0


# --- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 2 * 37), (4096, 2, 2 * 8960)])
def test_triton_kernels_match_float64(shape, dtype):
    if not sw.HAVE_TRITON:
        pytest.skip("no triton")
    y, dout = _inputs(shape, dtype, "cuda")
    leaf = y.clone().requires_grad_()
    out = sw.fused_swiglu(leaf)
    out.backward(dout)
    assert out.dtype == dtype and leaf.grad.dtype == dtype
    want_out, want_dy = _float64_reference(y, dout)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(leaf.grad.double(), want_dy, atol=tol, rtol=tol)
    with torch.no_grad():
        assert torch.equal(sw.fused_swiglu(y), out.detach())


@pytest.mark.gpu
@gpu
def test_triton_kernels_take_strided_input_and_check_width():
    if not sw.HAVE_TRITON:
        pytest.skip("no triton")
    y, _ = _inputs((5, 3, 2 * 40), torch.float32, "cuda")
    strided = y.transpose(0, 1).requires_grad_()  # [3, 5, 80], not contiguous
    out = sw.fused_swiglu(strided)
    dout = torch.randn_like(out)
    out.backward(dout)
    want_out, want_dy = _float64_reference(strided, dout)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided.grad.double(), want_dy, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even last dim"):
        sw.fused_swiglu(torch.zeros(2, 5, device="cuda"))
