"""SwiGLU on one GPU: the Triton kernels (``kernels/swiglu.py``) against the compiled reference.

fc1's output y [--rows, --width] bf16 (default: 8192 tokens of Qwen2.5-1.5B, 2F = 17920) and an
output gradient; times forward and forward+backward of
  compiled  ``torch.compile(swiglu_reference)`` (Inductor's kernels)
  fused     ``fused_swiglu`` (the Triton autograd function)
with the bandwidth each reaches (forward reads 2F and writes F elements per row, backward reads
2F + F and writes 2F) and the largest difference between the two outputs and input gradients.
``--sweep`` also times the fused kernels alone at other block sizes / warp counts.

    python benchmarks/swiglu_kernel.py [--rows 8192] [--width 17920] [--sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_kernels import timed  # noqa: E402

SWEEP = [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--width", type=int, default=17920, help="fc1's output width 2F")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time the kernels at the block sizes in SWEEP")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("swiglu_kernel.py needs a CUDA GPU")
        return 0
    from megatron_ualm.kernels.swiglu import fused_swiglu, swiglu_backward, swiglu_forward, swiglu_reference

    torch.manual_seed(0)
    y = torch.randn(args.rows, args.width, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dout = torch.randn(args.rows, args.width // 2, device="cuda", dtype=torch.bfloat16)
    elt = y.element_size()
    fwd_bytes = args.rows * (args.width + args.width // 2) * elt
    bwd_bytes = args.rows * (2 * args.width + args.width // 2) * elt
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; y [{args.rows}, {args.width}] bf16; "
          f"{fwd_bytes / 1e6:.0f} MB forward, {bwd_bytes / 1e6:.0f} MB backward")

    def figures(t_f: float, t_b: float) -> dict:
        return dict(fwd_ms=t_f, bwd_ms=t_b, fwd_gbs=fwd_bytes / t_f / 1e6, bwd_gbs=bwd_bytes / max(t_b, 1e-6) / 1e6)

    results, outs = {}, {}
    for name, fn in (("compiled", torch.compile(swiglu_reference)), ("fused", fused_swiglu)):
        y.grad = None
        out = fn(y)
        out.backward(dout)
        outs[name] = (out.detach(), y.grad)

        def fwd_only():
            with torch.no_grad():
                fn(y)

        def fwd_bwd():
            y.grad = None
            fn(y).backward(dout)

        t_f = timed(fwd_only, args.iters)
        t_fb = timed(fwd_bwd, args.iters)
        results[name] = r = figures(t_f, t_fb - t_f)
        print(f"{name:10s} fwd {t_f:6.3f} ms ({r['fwd_gbs']:5.0f} GB/s)  bwd {r['bwd_ms']:6.3f} ms "
              f"({r['bwd_gbs']:5.0f} GB/s)  fwd+bwd {t_fb:6.3f} ms")
    diff = {k: (a.float() - b.float()).abs().max().item()
            for k, a, b in zip(("out", "dy"), outs["fused"], outs["compiled"])}
    print("max abs diff fused vs compiled: " + "  ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    if args.sweep:
        x = y.detach()
        for block, warps in SWEEP:
            t_f = timed(lambda: swiglu_forward(x, block, warps), args.iters)
            t_b = timed(lambda: swiglu_backward(x, dout, block, warps), args.iters)
            results[f"kernels_block{block}_warps{warps}"] = r = figures(t_f, t_b)
            print(f"block {block:5d} warps {warps}: fwd {t_f:6.3f} ms ({r['fwd_gbs']:5.0f} GB/s)  "
                  f"bwd {t_b:6.3f} ms ({r['bwd_gbs']:5.0f} GB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=args.rows,
                           width=args.width, results=results, max_abs_diff=diff), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
