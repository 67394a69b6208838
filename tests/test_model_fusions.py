"""Compiled elementwise paths (``kernels/compile.py``) against their eager functions.

The inference graph runs RMSNorm, SwiGLU and RoPE through ``torch.compile`` on CUDA (training
uses Triton kernels: test_model_norm_kernel, test_model_rope_kernel, test_model_swiglu). On
CPU the same compiled functions (Inductor's CPU backend) are compared with eager forward and
backward; the RoPE function is also checked against megatron's own unfused RoPE.
The ``gpu`` tests compare the CUDA-compiled functions with eager on the device.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ualm.kernels.rmsnorm import rms_norm
from megatron_ualm.kernels.rope import rotate
from megatron_ualm.kernels.swiglu import swiglu_reference


def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 32, generator=g)
    w = torch.rand(32, generator=g) + 0.5
    y = torch.randn(6, 2, 40, generator=g)
    q = torch.randn(6, 2, 4, 16, generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])
    inv = 1.0 / (1e6 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = pos.t().float()[..., None] * inv
    freqs = torch.cat((freqs, freqs), -1)[:, :, None, :]
    to = dict(device=device, dtype=dtype)
    return [
        ("rms_norm", lambda f, a, b: f(a, b, 1e-6), (x.to(**to), w.to(**to))),
        ("swiglu", lambda f, a: f(a), (y.to(**to),)),
        ("rotate", lambda f, a, b: f(a, b), (q.to(**to), freqs.to(device))),
    ]


FUNCS = {"rms_norm": rms_norm, "swiglu": swiglu_reference, "rotate": rotate}


def _compare(device, dtype, atol, rtol):
    for name, call, inputs in _cases(device, dtype):
        fn = FUNCS[name]
        outs, grads = [], []
        for f in (fn, torch.compile(fn)):
            # every input gets a gradient except RoPE's angles
            leaves = [t.detach().clone().requires_grad_(name != "rotate" or i == 0) for i, t in enumerate(inputs)]
            out = call(f, *leaves)
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            out.backward(gout)
            outs.append(out.detach())
            grads.append([t.grad for t in leaves if t.requires_grad])
        torch.testing.assert_close(outs[1], outs[0], atol=atol, rtol=rtol, msg=name)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"{name} grad")


def test_compiled_fusions_match_eager_on_cpu():
    _compare("cpu", torch.float32, 1e-5, 1e-5)


def test_rotate_is_megatrons_rope():
    from megatron.core.models.common.embeddings import rope_utils
    from megatron_ualm.model.rope import install_fused_rope
    install_fused_rope()
    install_fused_rope()  # idempotent
    patched = rope_utils._apply_rotary_pos_emb_bshd
    original = patched.original
    assert not getattr(original, "__ualm_fused_rope__", False)
    _, _, (q, freqs) = _cases("cpu", torch.float32)[2]
    for dtype in (torch.float32, torch.bfloat16):
        t = q.to(dtype)
        want = original(t, freqs)
        torch.testing.assert_close(rotate(t, freqs), want, atol=0, rtol=0)
        torch.testing.assert_close(patched(t, freqs), want, atol=0, rtol=0)  # CPU: megatron's own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_fusions_match_eager_on_gpu():
    _compare("cuda", torch.float32, 1e-5, 1e-5)
    _compare("cuda", torch.bfloat16, 2e-2, 2e-2)
