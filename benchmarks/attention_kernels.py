"""Packed causal attention kernels, forward + backward, on one GPU: which is fastest, and do
they agree.

The training step's attention call: rows of ``--seq`` positions, ``--batch`` rows, each row
packed with examples of ``--min-doc``..``--max-doc`` positions (the lengths
train_throughput.py draws), causal within each example; Qwen2.5-1.5B heads (12 query, 2 KV,
head dim 128), bf16. Every kernel gets the same q, k, v and output gradient; outputs and
input gradients are compared with FlexAttention's (the training default for packed rows).

    python benchmarks/attention_kernels.py [--json out.json]

Kernels (each skipped with the reason printed when this torch/GPU lacks it):
  flex          FlexAttention (torch.compile) with a document block mask, GQA in the kernel;
                flex_* the same with other kernel options (block sizes, warps, stages)
  cudnn_varlen  cuDNN fused attention over the concatenated examples (cumulative lengths),
                K/V repeated to the query heads
  fa2_varlen    torch.nn.attention.varlen.varlen_attn (FlashAttention-2), K/V repeated
  sdpa_causal   SDPA plain causal over whole rows (not the packed mask; for scale only)
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import torch


def doc_lengths(batch: int, seq: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        at, lens = 0, []
        while at < seq:
            n = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), seq - at)
            lens.append(n)
            at += n
        rows.append(lens)
    return rows


def causal_flops(rows: list[list[int]], heads: int, dim: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of causal attention within each example."""
    pairs = sum(n * (n + 1) / 2 for lens in rows for n in lens)
    fwd = 4.0 * pairs * heads * dim
    return fwd, 2.5 * fwd


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--min-doc", type=int, default=256)
    p.add_argument("--max-doc", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--autotune", action="store_true", help="also FlexAttention compiled with max-autotune")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels.py needs a CUDA GPU")
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, S, H, G, D = args.batch, args.seq, args.heads, args.groups, args.dim
    rows = doc_lengths(B, S, args.min_doc, args.max_doc)
    docs = torch.tensor([[i for i, n in enumerate(lens) for _ in range(n)] for lens in rows],
                        dtype=torch.int32, device=dev)
    flat = [n for lens in rows for n in lens]
    cu = torch.tensor([0] + list(torch.tensor(flat).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    max_len = max(flat)
    scale = D ** -0.5
    # megatron's layout: [s, b, heads, d]
    q0 = torch.randn(S, B, H, D, device=dev, dtype=torch.bfloat16)
    k0 = torch.randn(S, B, G, D, device=dev, dtype=torch.bfloat16)
    v0 = torch.randn(S, B, G, D, device=dev, dtype=torch.bfloat16)
    dout = torch.randn(S, B, H, D, device=dev, dtype=torch.bfloat16)
    fwd_flops, bwd_flops = causal_flops(rows, H, D)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {B} x {S} rows, "
          f"{len(flat)} examples of {min(flat)}..{max_len}; {H} q / {G} kv heads of {D}; "
          f"{(fwd_flops + bwd_flops) / 1e9:.1f} GFLOP fwd+bwd per call")

    def bhsd(x):
        return x.permute(1, 2, 0, 3)

    def thd(x):  # [s, b, h, d] -> [b*s, h, d], examples contiguous
        return x.transpose(0, 1).reshape(B * S, x.shape[2], D)

    def from_thd(x):
        return x.reshape(B, S, x.shape[1], D).transpose(0, 1)

    kernels = {}

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & (docs[b, qi] == docs[b, ki])

    bm = create_block_mask(mask_mod, B, None, S, S, device=dev, _compile=True)

    def run_flex(q, k, v, opts=None):
        out = flex(bhsd(q), bhsd(k), bhsd(v), block_mask=bm, scale=scale, enable_gqa=True,
                   **({"kernel_options": opts} if opts else {}))
        return out.permute(2, 0, 1, 3)

    kernels["flex"] = run_flex
    variants = {
        "flex_rows_safe": dict(ROWS_GUARANTEED_SAFE=True),  # every causal row sees its diagonal
        "flex_bwd_warps4": dict(bwd_num_warps=4),
        "flex_bwd_stages2": dict(bwd_num_stages=2),
        "flex_bwd_stages4": dict(bwd_num_stages=4),
        "flex_bwd_64x64": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64),
        "flex_fwd_128x64_w8": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8),
    }
    for name, opts in variants.items():
        kernels[name] = (lambda o: (lambda q, k, v: run_flex(q, k, v, o)))(opts)
    if args.autotune:
        tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")

        def run_tuned(q, k, v):
            out = tuned(bhsd(q), bhsd(k), bhsd(v), block_mask=bm, scale=scale, enable_gqa=True)
            return out.permute(2, 0, 1, 3)

        kernels["flex_autotuned"] = run_tuned

    rep = H // G

    def run_cudnn(q, k, v, gqa=False):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2))
        out = torch.ops.aten._cudnn_attention_forward(
            thd(q), thd(kk), thd(vv), None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale)[0]
        return from_thd(out)

    kernels["cudnn_varlen"] = run_cudnn

    try:
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters

        def run_fa2(q, k, v):
            kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
            out = varlen_attn(thd(q), thd(kk), thd(vv), cu, cu, max_len, max_len, scale=scale, **kw)
            return from_thd(out)

        kernels["fa2_varlen"] = run_fa2
    except ImportError as e:
        print(f"fa2_varlen: skipped ({e})")

    def run_sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                bhsd(q), bhsd(k).repeat_interleave(rep, 1), bhsd(v).repeat_interleave(rep, 1),
                is_causal=True, scale=scale)
        return out.permute(2, 0, 1, 3)

    kernels["sdpa_causal_cudnn"] = run_sdpa

    results, ref = {}, None
    for name, fn in kernels.items():
        q, k, v = (x.detach().clone().requires_grad_() for x in (q0, k0, v0))
        try:
            out = fn(q, k, v)
            out.backward(dout)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a kernel this build lacks is reported, not fatal
            print(f"{name:20s} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        grads = (out.detach(), q.grad, k.grad, v.grad)
        if ref is None:
            ref = grads
        err = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(grads, ref)]

        def fwd_only():
            with torch.no_grad():
                fn(q0, k0, v0)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)

        t_f = timed(fwd_only, args.iters)
        t_fb = timed(fwd_bwd, args.iters)
        t_b = t_fb - t_f
        r = dict(fwd_ms=t_f, bwd_ms=t_b, total_ms=t_fb, fwd_tflops=fwd_flops / t_f / 1e9,
                 bwd_tflops=bwd_flops / max(t_b, 1e-6) / 1e9, rel_err_vs_flex=dict(zip(("out", "dq", "dk", "dv"), err)))
        results[name] = r
        note = "  (whole rows, not packed: for scale)" if name.startswith("sdpa") else ""
        print(f"{name:20s} fwd {t_f:6.3f} ms ({r['fwd_tflops']:5.0f} TFLOP/s)  bwd {t_b:6.3f} ms "
              f"({r['bwd_tflops']:5.0f})  total {t_fb:6.3f} ms  max rel. diff vs flex: "
              + " ".join(f"{k}={v:.1e}" for k, v in r["rel_err_vs_flex"].items()) + note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
                           results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
