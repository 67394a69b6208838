"""RMSNorm and SwiGLU on one GPU: our kernels (``megatron_ualm.kernels``) against liger-kernel
and eager PyTorch, forward + backward at the shapes training uses (bf16).

Shapes: the 1.5B model (Qwen2.5-1.5B: hidden 1536, ffn 8960) at micro-batch 2 x seq 4096 =
8192 tokens, and the 7B model (hidden 3584, ffn 18944) at micro-batch 1 x seq 4096 = 4096
tokens; activations as megatron holds them, [seq, micro-batch, width].

Variants, each called as a user of it would:
  ours         ``kernels.rmsnorm.fused_rms_norm`` / ``kernels.swiglu.fused_swiglu`` (fc1's output
               [..., 2F] as [gate; up], read in place)
  liger        ``LigerRMSNormFunction.apply(x, w, eps)`` (its defaults: Llama casting, the same
               rounding as Qwen2's; dx written into dy's buffer) /
               ``LigerSiLUMulFunction.apply(gate, up)`` on the two halves of fc1's output: the
               halves are strided views, so its ``ensure_contiguous`` copies both, and autograd
               concatenates the two half-gradients into fc1's gradient -- both timed
  liger-fused  ``LigerFusedGateUpSiLUMulFunction.apply(y, False)`` on fc1's output flattened to
               [rows, 2F] (liger's own fused gate-up SwiGLU for megatron's layout, called as its
               megatron MLP calls it; where the installed liger has it)
  eager        the plain-PyTorch references (``rms_norm``, ``swiglu_reference``)

Per variant and shape: correctness of the output and of every input/weight gradient against
an fp32 reference (the eager function on fp32 copies): the largest error relative to the
tensor's largest value must stay within four bf16 roundings (4 x 2^-8); the median time of
the forward alone and of forward + backward over ``--rounds`` x ``--iters`` iterations (CUDA
events, after a warm-up; the variants alternate round by round, A B C A B C, so clock and
thermal drift fall on all alike); GB/s: the bytes the operation must move (its activations
read and written once each way; the weight and per-row statistics left out: the same count
for every variant) over the forward + backward time.

    python benchmarks/liger_ab.py [--iters 20] [--rounds 5] [--json liger_ab.json]
    python benchmarks/liger_ab.py --tiny --device cpu    # smoke run: ours vs eager, no liger
    PHASES=liger bash benchmarks/gpu_round6.sh            # installs the liger wheel, runs this

Exit status 1 when a variant's result is out of tolerance. ``UALM_COMPILE=0`` turns our kernels
off (``ours`` is then the eager reference; the table says so).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

SHAPES = {  # name: (seq, micro-batch, hidden, ffn)
    "1.5b": (4096, 2, 1536, 8960),
    "7b": (4096, 1, 3584, 18944),
}
TINY = {"tiny": (16, 2, 48, 80)}
EPS = 1e-6
BF16_TOL = 4 * 2.0 ** -8  # four roundings at bf16's unit roundoff
TINY_ITERS = (2, 2, 1)  # iterations, rounds, warm-up of the smoke run


@dataclass
class Options:
    device: str = "cuda"
    tiny: bool = False
    iters: int = 20
    rounds: int = 5
    warmup: int = 10
    json: str = ""


def load_liger():
    """liger-kernel's Functions as {name: Function}, or None with the reason (imported lazily:
    it needs CUDA and Triton, and is no dependency of megatron_ualm)."""
    try:
        from liger_kernel.ops import rms_norm as liger_rms_norm
        from liger_kernel.ops import swiglu as liger_swiglu
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "liger_kernel":
            return None, ("liger-kernel is not installed: comparing ours with eager only ("
                          "PHASES=liger bash benchmarks/gpu_round6.sh installs it from .whl/extra)")
        return None, f"liger-kernel is installed but does not import ({e}): comparing ours with eager only"
    fns = {"rms_norm": liger_rms_norm.LigerRMSNormFunction, "silu_mul": liger_swiglu.LigerSiLUMulFunction,
           "fused_gate_up": getattr(liger_swiglu, "LigerFusedGateUpSiLUMulFunction", None)}
    return fns, None


# --- the variants: each takes the leaves and returns the output -------------------------------------
def rmsnorm_variants(liger) -> dict:
    from megatron_ualm.kernels import rmsnorm
    out = {"ours": lambda x, w: rmsnorm.fused_rms_norm(x, w, EPS)}
    if liger:
        fn = liger["rms_norm"]
        out["liger"] = lambda x, w: fn.apply(x, w, EPS)
    out["eager"] = lambda x, w: rmsnorm.rms_norm(x, w, EPS)
    return out


def swiglu_variants(liger) -> dict:
    from megatron_ualm.kernels import swiglu
    out = {"ours": swiglu.fused_swiglu}
    if liger:
        silu_mul, fused = liger["silu_mul"], liger["fused_gate_up"]

        def liger_halves(y):
            gate, up = torch.chunk(y, 2, dim=-1)
            return silu_mul.apply(gate, up)

        out["liger"] = liger_halves
        if fused is not None:  # it saves and returns the 2-D [rows, 2F] view: flatten as its megatron MLP does
            out["liger-fused"] = lambda y: fused.apply(y.view(-1, y.shape[-1]), False).view(*y.shape[:-1], -1)
    out["eager"] = swiglu.swiglu_reference
    return out


def problems(opts: Options, liger) -> list:
    """(op, shape name, inputs (bf16, on the device), variants, bytes moved fwd + bwd)."""
    out = []
    for name, (seq, mb, hidden, ffn) in (TINY if opts.tiny else SHAPES).items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(seq, mb, hidden, generator=g) * 2
        w = 1 + 0.2 * torch.randn(hidden, generator=g)
        dy = torch.randn(seq, mb, hidden, generator=g)
        n = seq * mb
        bf16 = dict(device=opts.device, dtype=torch.bfloat16)
        # RMSNorm: fwd reads x, writes y; bwd reads x and dy, writes dx
        out.append(("rmsnorm", name, (x.to(**bf16), w.to(**bf16)), dy.to(**bf16), rmsnorm_variants(liger),
                    5 * n * hidden * 2))
        y = torch.randn(seq, mb, 2 * ffn, generator=g) * 2
        dout = torch.randn(seq, mb, ffn, generator=g)
        # SwiGLU: fwd reads y [n, 2F], writes out [n, F]; bwd reads y and dout, writes dy [n, 2F]
        out.append(("swiglu", name, (y.to(**bf16),), dout.to(**bf16), swiglu_variants(liger), 8 * n * ffn * 2))
    return out


def fp32_reference(op: str, inputs: tuple, grad: torch.Tensor) -> list:
    """Output and input gradients of the eager function on fp32 copies."""
    from megatron_ualm.kernels import rmsnorm, swiglu
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = rmsnorm.rms_norm(*leaves, EPS) if op == "rmsnorm" else swiglu.swiglu_reference(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.float())
    return [out.detach(), *grads]


def run_once(fn, inputs: tuple, grad: torch.Tensor, backward: bool = True) -> list:
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if not backward:
        return [out]
    # a fresh dy: liger's RMSNorm backward writes dx into dy's buffer
    return [out, *torch.autograd.grad(out, leaves, grad.clone())]


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want| (0 for an all-zero reference that is matched)."""
    err = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    return err / scale if scale > 0 else err


class Timer:
    """Per-call milliseconds: CUDA events on the GPU, wall clock on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def time(self, call, iters: int) -> list:
        if not self.cuda:
            out = []
            for _ in range(iters):
                t = time.perf_counter()
                call()
                out.append((time.perf_counter() - t) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def measure(opts: Options, liger) -> list:
    timer = Timer(opts.device)
    results = []
    for op, shape, inputs, grad, variants, nbytes in problems(opts, liger):
        want = fp32_reference(op, inputs, grad)
        rows = {}
        for name, fn in variants.items():
            got = run_once(fn, inputs, grad)
            errors = [max_rel_error(a, b) for a, b in zip(got, want)]
            labels = ["out", "dx", "dw"] if op == "rmsnorm" else ["out", "dy"]
            rows[name] = {"op": op, "shape": shape, "variant": name,
                          "errors": dict(zip(labels, errors)), "ok": all(e <= BF16_TOL for e in errors),
                          "fwd_ms": [], "fwd_bwd_ms": []}
            for _ in range(opts.warmup):
                run_once(fn, inputs, grad)
        if timer.cuda:
            torch.cuda.synchronize()
        for _ in range(opts.rounds):  # A B C A B C ...: drift falls on every variant alike
            for name, fn in variants.items():
                rows[name]["fwd_ms"] += timer.time(lambda: run_once(fn, inputs, grad, backward=False), opts.iters)
                rows[name]["fwd_bwd_ms"] += timer.time(lambda: run_once(fn, inputs, grad), opts.iters)
        for row in rows.values():
            for key in ("fwd_ms", "fwd_bwd_ms"):
                row[f"{key}_iters"] = len(row[key])
                row[key] = statistics.median(row[key])
            row["gb_per_s"] = nbytes / (row["fwd_bwd_ms"] * 1e-3) / 1e9
            row["bytes"] = nbytes
            results.append(row)
    return results


def table(results: list) -> str:
    head = (f"{'op':8} {'shape':6} {'variant':12} {'fwd ms':>8} {'fwd+bwd ms':>11} {'GB/s':>7} {'vs ours':>8}"
            "  max rel. error vs fp32")
    lines = [head, "-" * len(head)]
    ours = {(r["op"], r["shape"]): r["fwd_bwd_ms"] for r in results if r["variant"] == "ours"}
    for r in results:
        errs = " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        ratio = r["fwd_bwd_ms"] / ours[(r["op"], r["shape"])]
        lines.append(f"{r['op']:8} {r['shape']:6} {r['variant']:12} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:11.3f} "
                     f"{r['gb_per_s']:7.1f} {ratio:7.2f}x  {errs}{'' if r['ok'] else '  OUT OF TOLERANCE'}")
    return "\n".join(lines)


def parse(argv=None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=d.device, help="cuda (the measurement) or cpu (the smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few iterations: a smoke run")
    p.add_argument("--iters", type=int, default=None, help=f"timed iterations per variant per round ({d.iters})")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds of alternating variants ({d.rounds})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed iterations per variant first ({d.warmup})")
    p.add_argument("--json", default=d.json, help="write the results here as JSON")
    a = p.parse_args(argv)
    defaults = TINY_ITERS if a.tiny else (d.iters, d.rounds, d.warmup)
    given = (a.iters, a.rounds, a.warmup)
    iters, rounds, warmup = (v if v is not None else dv for v, dv in zip(given, defaults))
    return Options(device=a.device, tiny=a.tiny, iters=iters, rounds=rounds, warmup=warmup, json=a.json)


def main(argv=None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        print("liger_ab.py needs a CUDA GPU (the smoke run: --tiny --device cpu)")
        return 0
    from megatron_ualm import kernels
    if opts.device.startswith("cuda"):
        liger, why = load_liger()
        if why:
            print(why)
        if not kernels.use_kernels(torch.empty(0, device=opts.device)):
            print("our kernels are off (UALM_COMPILE=0 or no Triton): 'ours' is the eager reference")
    else:
        liger = None
        print("liger-kernel needs CUDA and Triton: skipped on", opts.device)
    results = measure(opts, liger)
    print(table(results))
    info = {"device": torch.cuda.get_device_name() if opts.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__, "kernels_enabled": kernels.ENABLED, "options": vars(opts),
            "tolerance": BF16_TOL}
    try:
        info["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        info["liger_kernel"] = None
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
        print("wrote", opts.json)
    bad = [f"{r['op']} {r['shape']} {r['variant']}" for r in results if not r["ok"]]
    if bad:
        print("out of tolerance vs the fp32 reference:", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
