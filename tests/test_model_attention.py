"""Every CPU-runnable attention backend against a plain masked implementation."""
from __future__ import annotations

import math

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ualm.model.attention import MaskCache, UALMCoreAttention, resolve_backend
from megatron_ualm.model.batch import is_packed

HEADS, GROUPS, DIM = 4, 2, 8


def plain_attention(q, k, v, document_ids=None):
    """q [sq, b, h, d], k/v [sk, b, g, d] -> [sq, b, h*d]: explicit loops over the mask rule
    (query i of sq sits at absolute position sk - sq + i)."""
    sq, b, h, d = q.shape
    sk, g = k.shape[0], k.shape[2]
    out = torch.zeros(sq, b, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(sq):
                p = sk - sq + i
                keys = [j for j in range(sk) if j <= p and
                        (document_ids is None or document_ids[bi, j] == document_ids[bi, p])]
                s = torch.stack([(q[i, bi, hi].double() * k[j, bi, gi].double()).sum() / math.sqrt(d) for j in keys])
                w = torch.softmax(s, 0)
                out[i, bi, hi] = sum(w[n] * v[j, bi, gi].double() for n, j in enumerate(keys))
    return out.reshape(sq, b, h * d)


def _config():
    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=DIM, use_cpu_initialization=True,
                             attention_dropout=0.0, hidden_dropout=0.0)


def _inputs(sq, sk, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, HEADS, DIM, generator=g, requires_grad=True)
    k = torch.randn(sk, b, GROUPS, DIM, generator=g, requires_grad=True)
    v = torch.randn(sk, b, GROUPS, DIM, generator=g, requires_grad=True)
    return q, k, v


PACKED_DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1],
                            [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "unfused", "auto", "te"])
@pytest.mark.parametrize("packed", [False, True])
def test_backend_matches_plain_attention(backend, packed):
    S, B = PACKED_DOCS.shape[1], PACKED_DOCS.shape[0]
    docs = PACKED_DOCS if packed else None
    attn = UALMCoreAttention(_config(), layer_number=1, backend=backend, mask_cache=MaskCache())
    q, k, v = _inputs(S, S, B)
    out = attn(q, k, v, docs)
    ref = plain_attention(q, k, v, docs)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if backend == "flex":  # no FlexAttention backward on CPU (the module falls back to sdpa)
        with torch.no_grad():
            torch.testing.assert_close(attn(q, k, v, docs).double(), ref, atol=1e-5, rtol=1e-5)
    # gradients against autograd through the float64 reference
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rq, rk, rv = torch.autograd.grad(plain_attention(qd, kd, vd, docs), (qd, kd, vd), grad.double())
    for a, r in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "unfused", "flex"])
@pytest.mark.parametrize("sq", [1, 3])
def test_cached_queries_are_bottom_right_causal(backend, sq):
    attn = UALMCoreAttention(_config(), layer_number=1, backend=backend, mask_cache=MaskCache())
    q, k, v = _inputs(sq, 9, 2, seed=1)
    with torch.no_grad():
        out = attn(q, k, v, None)
    torch.testing.assert_close(out.double(), plain_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_auto_picks_by_device_and_packing():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, True) == "sdpa"
    assert resolve_backend("auto", gpu, True) == "flex"
    assert resolve_backend("auto", gpu, False) == "sdpa"
    assert resolve_backend("flex", cpu, False) == "flex"


def test_is_packed_ignores_trailing_padding():
    assert not is_packed(torch.tensor([[0, 0, 0, -1, -1]]))
    assert is_packed(torch.tensor([[0, 0, 1, 1, -1]]))
    assert is_packed(torch.tensor([[-1, 0, 0, 0, 0]]))


def test_mask_cache_is_per_tensor_contents():
    cache = MaskCache()
    docs = torch.tensor([[0, 0, 1]])
    calls = []
    build = lambda: calls.append(1) or len(calls)
    assert cache.get("dense", docs, build) == 1
    assert cache.get("dense", docs, build) == 1        # same tensor: cached
    assert cache.get("dense", docs.detach(), build) == 1  # alias (recompute): cached
    docs[0, 0] = 1                                      # in-place change: rebuilt
    assert cache.get("dense", docs, build) == 2
    assert cache.get("dense", torch.tensor([[0, 0, 1]]), build) == 3
