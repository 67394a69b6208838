"""The fused head cross entropy (``kernels/cross_entropy.py``) against the reference path.

CPU: the PyTorch fallback of the two passes against plain float64 log-softmax, the
autograd function's gradients against autograd through materialised logits, and the whole
head (``fused_ce=True``) against the unfused head (megatron's vocab-parallel CE) on a real
packed batch. GPU (``gpu`` mark): the Triton kernels against the fallback, and the bf16 head
against float32/float64 references.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_batches import make_examples, model_inputs, pack, tiny_model_cfg


def _reference_ce(rows, weight, segments, targets, same_dtype_logits=False):
    """float64 CE / correctness per row through materialised logits (targets relative to c0);
    ``same_dtype_logits``: logits from the product in the inputs' dtype, then float64."""
    ce = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    ok = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    for r0, r1, c0, c1, nv in segments:
        if same_dtype_logits:
            logits = (rows[r0:r1] @ weight[c0:c1].t())[:, :nv].double()
        else:
            logits = rows[r0:r1].double() @ weight[c0:c0 + nv].double().t()
        t = targets[r0:r1]
        ce[r0:r1] = -F.log_softmax(logits, -1).gather(1, t[:, None])[:, 0]
        ok[r0:r1] = logits.gather(1, t[:, None])[:, 0] >= logits.max(-1).values
    return ce, ok


def _problem(dtype=torch.float32, device="cpu", seed=0, H=24, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    V = 200
    # a full-width segment with 13 padding columns, two narrow blocks, one empty segment
    segments = [(0, 37, 0, V, V - 13), (37, 50, 120, 150, 30), (50, 50, 150, 180, 30), (50, 61, 180, 200, 20)]
    N = 61
    rows = torch.randn(N, H, generator=g) * 2 * scale
    weight = torch.randn(V, H, generator=g) * scale
    targets = torch.cat([torch.randint(0, nv, (r1 - r0,), generator=g) for r0, r1, c0, c1, nv in segments])
    return (rows.to(device, dtype).requires_grad_(), weight.to(device, dtype).requires_grad_(), segments,
            targets.to(device))


def test_fallback_passes_match_float64():
    from megatron_ualm.kernels.cross_entropy import ce_grad_, ce_stats
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 50, generator=g) * 4
    x[3] = float("-inf")  # a row with nothing valid (another rank's block)
    t = torch.randint(0, 40, (9,), generator=g)
    t[5] = -1  # target on another rank
    m, s, picked = ce_stats(x.clone(), t, 40)
    ref = x[:, :40].double()
    finite = torch.arange(9) != 3
    torch.testing.assert_close(m[finite].double(), ref[finite].max(-1).values)
    torch.testing.assert_close(torch.log(s[finite].double()) + m[finite].double(), torch.logsumexp(ref[finite], -1))
    assert m[3] == float("-inf") and s[3] == 0
    assert picked[5] == 0 and picked[0] == x[0, t[0]]
    lse = torch.logsumexp(ref, -1).float()
    lse[3] = 0.0
    p = ce_grad_(x.clone(), t, lse, 40)
    want = torch.softmax(ref, -1).float()
    want[3] = 0.0
    rows = torch.nonzero(t >= 0)[:, 0]
    want = torch.cat([want, torch.zeros(9, 10)], 1)
    want[rows, t[rows]] -= 1
    torch.testing.assert_close(p, want, atol=1e-6, rtol=1e-5)


def test_head_cross_entropy_matches_materialised_logits():
    from megatron_ualm.kernels.cross_entropy import head_cross_entropy
    rows, weight, segments, targets = _problem()
    ce, ok = head_cross_entropy(rows, weight, segments, targets)
    ref_ce, ref_ok = _reference_ce(rows.detach(), weight.detach(), segments, targets)
    torch.testing.assert_close(ce.double(), ref_ce, atol=2e-5, rtol=1e-5)
    assert torch.equal(ok, ref_ok)
    # gradients for a per-row upstream weighting (as the UALM loss gives)
    w = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(2))
    (ce * w).sum().backward()
    r2, w2 = rows.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = 0.0
    for (r0, r1, c0, c1, nv) in segments:
        logits = r2[r0:r1] @ w2[c0:c0 + nv].t()
        loss = loss + (F.cross_entropy(logits, targets[r0:r1], reduction="none") * w[r0:r1]).sum()
    loss.backward()
    torch.testing.assert_close(rows.grad, r2.grad, atol=1e-5, rtol=1e-4)
    # padding columns of segment 0 (187..199) get only what segment 3 (180..199) gives them
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-4)


def _fused_vs_unfused_head(audio_head: str) -> bool:
    """In a child process (the CPU runtime patches torch.cuda process-wide, which would break
    the GPU tests of this module): the fused and the unfused head on one packed batch."""
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device="cpu", seed=5)
    cfg = tiny_model_cfg(audio_head=audio_head)
    torch.manual_seed(0)
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32"))
    ex, clips = make_examples(model.vocab)
    batch = pack(None, 64, clips, model.vocab.num_codebooks, rows_of=[[ex["tta"], ex["qa"]], [ex["text"], ex["tta"]]])
    results = []
    for fused in (False, True):
        model.head.fused_ce = fused
        model.zero_grad(set_to_none=True)
        out = model(**model_inputs(batch))
        ualm_loss(out.ce, batch["loss_weights"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.ce.detach(), out.correct, grads))
    (ce0, ok0, g0), (ce1, ok1, g1) = results
    assert (batch["loss_weights"] > 0).any(dim=(0, 1)).all()
    torch.testing.assert_close(ce1, ce0, atol=2e-5, rtol=1e-5)
    assert torch.equal(ok1, ok0)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-4, msg=n)
    shutdown_runtime()
    return True


@pytest.mark.parametrize("audio_head", ["codebook", "all_audio"])
def test_fused_head_matches_unfused_head(audio_head):
    from dist_utils import run_distributed
    assert run_distributed(_fused_vs_unfused_head, 1, audio_head) == [True]


# --- GPU ------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_triton_passes_match_fallback():
    from megatron_ualm.kernels import cross_entropy as fused_ce
    if not fused_ce.HAVE_TRITON:
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        for n, c, nv in [(33, 160_512, 160_392), (300, 1025, 1025), (5, 7000, 0), (17, 4096, 4000)]:
            x = (torch.randn(n, c, generator=g) * 3).to("cuda", dtype)
            t = torch.randint(-1, max(nv, 1), (n,), generator=g).cuda()
            if nv == 0:
                t.fill_(-1)
            got = fused_ce.ce_stats(x, t, nv)
            want = fused_ce._ce_stats_torch(x, t, nv)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            lse = torch.where(torch.isinf(want[0]), torch.zeros_like(want[0]), torch.log(want[1]) + want[0])
            got_p = fused_ce.ce_grad_(x.clone(), t, lse, nv)
            want_p = fused_ce._ce_grad_torch_(x.clone(), t, lse, nv)
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            torch.testing.assert_close(got_p.float(), want_p.float(), atol=tol, rtol=0)


@pytest.mark.gpu
@gpu
def test_bf16_head_cross_entropy_on_gpu():
    from megatron_ualm.kernels.cross_entropy import head_cross_entropy
    rows, weight, segments, targets = _problem(torch.bfloat16, "cuda", seed=4, H=128, scale=0.3)
    ce, ok = head_cross_entropy(rows, weight, segments, targets)
    with torch.no_grad():
        ref_ce, ref_ok = _reference_ce(rows, weight, segments, targets, same_dtype_logits=True)
    torch.testing.assert_close(ce.double(), ref_ce, atol=1e-4, rtol=1e-4)
    assert (ok == ref_ok).float().mean() > 0.95  # ties in bf16 may differ
    w = torch.rand(rows.shape[0], device="cuda")
    (ce * w).sum().backward()
    r2 = rows.detach().float().requires_grad_()
    w2 = weight.detach().float().requires_grad_()
    loss = 0.0
    for (r0, r1, c0, c1, nv) in segments:
        logits = r2[r0:r1] @ w2[c0:c0 + nv].t()
        loss = loss + (F.cross_entropy(logits, targets[r0:r1], reduction="none") * w[r0:r1]).sum()
    loss.backward()
    for got, want in ((rows.grad, r2.grad), (weight.grad, w2.grad)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, float(err)
