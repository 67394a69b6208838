"""RoPE application (``kernels/rope.py``): the Triton kernels behind ``fused_rotate``.

CPU: ``fused_rotate`` is ``rotate`` there; a PyTorch transcription of the kernels' float32 math
(forward and backward) against autograd of ``rotate`` in float64, with Qwen2's base and
positions up to 32k, angles shared by the batch or per row, and angles whose two halves differ
(the kernels read each half's own angles); which inputs the kernels take. The kernels under
Triton's interpreter where Triton is installed (strided q/k views of a fused QKV tensor, odd
position counts, a strided gradient). GPU (``gpu`` mark): the kernels against float64
autograd at training sizes, forward and backward, and megatron's RoPE after
``install_fused_rope``.
"""
from __future__ import annotations


import pytest
import torch

from kernel_utils import run_under_triton_interpreter
from megatron_ualm.kernels import rope as rp
from megatron_ualm.model.rope import RotaryAngles, install_fused_rope

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BASE = 1e6  # Qwen2's RoPE base


def _angles(s, freq_batch, d, seed=0, max_pos=32768, distinct_halves=False):
    """float32 angles [s, freq_batch, 1, d] from random positions below max_pos; with
    distinct_halves the second half gets other angles than the first."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (freq_batch, s), generator=g)
    freqs = RotaryAngles(d, BASE)(positions)
    if distinct_halves:
        freqs[..., d // 2:] += torch.rand(s, freq_batch, 1, d // 2, generator=g) * 3
    return freqs


def _float64_reference(t, freqs, grad):
    """(out, dt) by autograd of ``rotate`` in float64."""
    t64 = t.detach().double().requires_grad_()
    out = rp.rotate(t64, freqs.double())
    out.backward(grad.double())
    return out.detach(), t64.grad


def _kernel_math(t, freqs, grad):
    """The kernels' arithmetic, operation for operation, in PyTorch: float32 cos/sin of each
    half's angles, float32 math, one rounding to t's dtype."""
    a1, a2 = freqs.float().chunk(2, -1)
    cos1, sin1, cos2, sin2 = torch.cos(a1), torch.sin(a1), torch.cos(a2), torch.sin(a2)
    x1, x2 = t.float().chunk(2, -1)
    out = torch.cat([x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2], -1)
    g1, g2 = grad.float().chunk(2, -1)
    dt = torch.cat([g1 * cos1 + g2 * sin2, g2 * cos2 - g1 * sin1], -1)
    return out.to(t.dtype), dt.to(t.dtype)


def _inputs(shape, freq_batch, dtype, device="cpu", seed=0, distinct_halves=False):
    s, b, heads, d = shape
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randn(shape, generator=g) * 2
    grad = torch.randn(shape, generator=g)
    freqs = _angles(s, freq_batch, d, seed, distinct_halves=distinct_halves)
    return t.to(device, dtype), freqs.to(device), grad.to(device, dtype)


# --- CPU ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freq_batch", [1, 3])
def test_fused_rotate_is_rotate_on_cpu(freq_batch):
    for dtype in (torch.float32, torch.bfloat16):
        t, freqs, grad = _inputs((6, 3, 4, 16), freq_batch, dtype)
        results = []
        for f in (rp.fused_rotate, rp.rotate):
            leaf = t.clone().requires_grad_()
            out = f(leaf, freqs)
            out.backward(grad)
            results.append((out.detach(), leaf.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("distinct_halves", [False, True])
@pytest.mark.parametrize("freq_batch", [1, 3])
def test_kernel_math_matches_float64_autograd(freq_batch, distinct_halves):
    t, freqs, grad = _inputs((64, 3, 5, 128), freq_batch, torch.float32, distinct_halves=distinct_halves)
    assert freqs.max() > 3e4  # positions near 32k: large angles for cos/sin
    out, dt = _kernel_math(t, freqs, grad)
    want_out, want_dt = _float64_reference(t, freqs, grad)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dt.double(), want_dt, atol=1e-5, rtol=1e-5)


def test_kernel_math_in_bf16_is_within_bf16_of_float64():
    t, freqs, grad = _inputs((64, 2, 12, 128), 2, torch.bfloat16)
    out, dt = _kernel_math(t, freqs, grad)
    want_out, want_dt = _float64_reference(t, freqs, grad)
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dt.double(), want_dt, atol=1e-2, rtol=1e-2)


def test_which_inputs_the_kernels_take():
    t, freqs, _ = _inputs((6, 3, 4, 16), 3, torch.bfloat16)
    assert rp.fusable(t, freqs)
    assert rp.fusable(t, freqs[:, :1])  # shared by the batch
    assert rp.fusable(t.transpose(0, 1).contiguous().transpose(0, 1), freqs)  # strided t
    assert not rp.fusable(t, freqs[:1])  # broadcast over s
    assert not rp.fusable(t, freqs[..., :8])  # partial rotary dim
    assert not rp.fusable(t, freqs.double())
    assert not rp.fusable(t.double(), freqs)
    assert not rp.fusable(t, freqs.clone().requires_grad_())  # the kernels give freqs no gradient
    assert not rp.fusable(t[..., :15], freqs[..., :15])  # odd head dim
    with pytest.raises(ValueError, match="rope kernel needs"):
        rp.rope_forward(t, freqs[:1])


_INTERPRETED = """
import torch
from megatron_ualm.kernels import rope as rp
from megatron_ualm.model.rope import RotaryAngles, install_fused_rope

def reference(t, freqs, grad):
    t64 = t.detach().double().requires_grad_()
    out = rp.rotate(t64, freqs.double())
    out.backward(grad.double())
    return out.detach(), t64.grad

def angles(s, fb, d, distinct):
    freqs = RotaryAngles(d, 1e6)(torch.randint(0, 32768, (fb, s)))
    if distinct:
        freqs[..., d // 2:] += torch.rand(s, fb, 1, d // 2) * 3
    return freqs

def check(t, freqs, grad, num_warps=rp.NUM_WARPS):
    out = rp.rope_forward(t, freqs, num_warps=num_warps)
    dt = rp.rope_backward(grad, freqs, num_warps=num_warps)
    assert out.is_contiguous() and dt.is_contiguous() and out.dtype == t.dtype
    want_out, want_dt = reference(t, freqs, grad)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dt.double(), want_dt, atol=1e-5, rtol=1e-5)
    return out, dt

torch.manual_seed(0)
# plain contiguous t; angles per row or shared (b = 1); odd s * b; heads not a multiple of the
# heads per loop step; a head dim that is not a power of two (masked columns); other warp counts
for (s, b, heads, d), fb, distinct, warps in [((5, 3, 3, 16), 3, True, 4), ((7, 3, 5, 128), 1, False, 4),
                                            ((7, 1, 2, 8), 1, True, 1), ((9, 2, 6, 20), 2, True, 2),
                                            ((3, 3, 12, 128), 3, True, 8)]:
    t, grad = torch.randn(s, b, heads, d) * 2, torch.randn(s, b, heads, d)
    check(t, angles(s, fb, d, distinct), grad, warps)

# q and k as megatron takes them out of the fused QKV output: mixed [s, b, groups,
# (heads_per_group + 2) * d] split on the last dim; q of one group (tensor parallel > 1) stays a
# view, k is a view; the gradient is strided too
s, b, d, per_group = 7, 3, 128, 6
for groups in (1, 2):
    mixed = torch.randn(s, b, groups, (per_group + 2) * d) * 2
    q, k, v = mixed.split([per_group * d, d, d], dim=-1)
    q = q.reshape(s, b, groups * per_group, d)
    assert not k.is_contiguous() and (groups > 1 or not q.is_contiguous())
    for fb in (1, b):
        freqs = angles(s, fb, d, True)
        for t in (q, k):
            grad = torch.randn(b, s, t.shape[2], d).transpose(0, 1)
            out, dt = check(t, freqs, grad)
            assert torch.equal(out, rp.rope_forward(t.contiguous(), freqs))

# the autograd Function: forward and backward by the kernels, into a strided leaf
mixed = torch.randn(s, b, 1, (per_group + 2) * d, requires_grad=True)
q = mixed[..., :per_group * d].view(s, b, per_group, d)
freqs = angles(s, b, d, True)
grad = torch.randn(s, b, per_group, d)
out = rp._RoPE.apply(q, freqs)
out.backward(grad)
assert torch.equal(out.detach(), rp.rope_forward(q.detach(), freqs))
assert torch.equal(mixed.grad[..., :per_group * d].reshape(s, b, per_group, d), rp.rope_backward(grad, freqs))
assert not mixed.grad[..., per_group * d:].any()
print("ok")
"""


def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_INTERPRETED, timeout=600)


# --- GPU ------------------------------------------------------------------------------------------------
def _strided_t(s, b, heads, d, dtype, seed=0):
    """t [s, b, heads, d] as a view of a fused QKV-like tensor [s, b, 1, (heads + 2) * d] (megatron's
    q of one query group, or k), and that tensor (a leaf)."""
    g = torch.Generator().manual_seed(seed)
    mixed = (torch.randn(s, b, 1, (heads + 2) * d, generator=g) * 2).to("cuda", dtype).requires_grad_()
    return mixed[..., :heads * d].view(s, b, heads, d), mixed


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [12, 2])
@pytest.mark.parametrize("freq_batch", [2, 1])
def test_triton_kernels_match_float64(heads, dtype, freq_batch):
    if not rp.HAVE_TRITON:
        pytest.skip("no triton")
    s, b, d = 4096, 2, 128
    t, mixed = _strided_t(s, b, heads, d, dtype)
    assert not t.is_contiguous()
    freqs = _angles(s, freq_batch, d, distinct_halves=True).cuda()
    grad = torch.randn(s, b, heads, d, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    out = rp.fused_rotate(t, freqs)
    assert type(out.grad_fn).__name__ == "_RoPEBackward"
    out.backward(grad)
    assert out.dtype == dtype and out.is_contiguous()
    dt = mixed.grad[..., :heads * d].view(s, b, heads, d)
    assert not mixed.grad[..., heads * d:].any()
    want_out, want_dt = _float64_reference(t, freqs, grad)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(dt.double(), want_dt, atol=tol, rtol=tol)
    with torch.no_grad():
        assert torch.equal(rp.fused_rotate(t, freqs), out.detach())
        assert torch.equal(rp.fused_rotate(t.contiguous(), freqs), out.detach())
    # a strided gradient gives the same result
    assert torch.equal(rp.rope_backward(grad.transpose(0, 1).contiguous().transpose(0, 1), freqs), dt)


@pytest.mark.gpu
@gpu
def test_megatron_rope_after_install_is_the_kernel():
    """After ``install_fused_rope`` megatron's unfused RoPE on CUDA is ``fused_rotate``: equal to
    ``rotate`` in float32; in bf16, where megatron's eager version rounds cos, sin and both products
    to bf16 before adding (off by a few bf16 ulps where the two terms cancel), no farther from the
    float64 result than it. With ``kernels.ENABLED`` off it is megatron's own function."""
    if not rp.HAVE_TRITON:
        pytest.skip("no triton")
    from megatron.core.models.common.embeddings import rope_utils
    from megatron_ualm import kernels
    install_fused_rope()
    patched = rope_utils._apply_rotary_pos_emb_bshd
    original = patched.original
    s, b, heads, d = 512, 2, 12, 128
    freqs = _angles(s, b, d).cuda()
    for dtype in (torch.bfloat16, torch.float32):
        t, _ = _strided_t(s, b, heads, d, dtype)
        t = t.detach()
        out = patched(t, freqs)
        assert torch.equal(out, rp.fused_rotate(t, freqs))
        eager = rp.rotate(t, freqs)
        assert torch.equal(eager, original(t, freqs))
        if dtype == torch.float32:
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        else:
            want = rp.rotate(t.double(), freqs.double())
            assert (out.double() - want).abs().max() <= (eager.double() - want).abs().max()
            torch.testing.assert_close(out, eager, atol=6e-2, rtol=2e-2)
        enabled = kernels.ENABLED
        try:
            kernels.ENABLED = False
            assert torch.equal(patched(t, freqs), original(t, freqs))
        finally:
            kernels.ENABLED = enabled
