#!/usr/bin/env python
"""FP8 vs bf16 for the decoder's linear layers (``training.fp8``), in one process on one GPU.

    python benchmarks/fp8_ab.py --out benchmarks/results/fp8      # H100/H200, ~5 minutes
    python benchmarks/fp8_ab.py --tiny                            # CPU smoke run (emulated FP8)

Three parts, bf16 and FP8 measured by the same script run, results in ``--out``/fp8_ab.json
(default ``$OUT`` or benchmarks/results):

1. ``gemm``: per linear layer of the 1.5B and 7B shapes (8192 tokens), median ms of
   * the bf16 forward GEMM, the FP8 forward GEMM alone (``_scaled_mm``, operands cast
     beforehand), and the activation cast: the fused kernel with delayed scaling (one read,
     one write), current scaling (amax pass + kernel) and a naive amax + scale + clamp +
     cast in PyTorch; the weight's cast with its transposed copy (once per optimizer step);
   * a whole layer forward + backward (weight gradient accumulated into an fp32 main_grad):
     bf16 (megatron's math) vs ``fp8.FP8Linear`` with delayed and with current scaling, the
     weight cast in every call (one micro-batch per optimizer step).
2. ``step``: training tokens/s of ``train_throughput.py``'s UALM step (megatron DDP,
   distributed optimizer, CUDA graphs: as the trainer runs it), ``--accumulate`` micro-batches
   per optimizer step, for the 1.5B shape (seq 4096, micro-batch 2) and the 7B width with
   ``--layers-7b`` layers (seq 4096, micro-batch 1), fp8 off / on.
3. ``loss``: the same model, data and seed trained ``--loss-steps`` steps with bf16 and with
   FP8 GEMMs (1.5B shape, ``--loss-layers`` layers, seq ``--loss-seq``, micro-batch 2, lr
   warmed up linearly to 1e-4 over 20 steps, 64 packed batches of Markov-chain text and audio
   in turn: a learnable source whose loss falls smoothly), plus a control: bf16 again from
   another initialisation seed, i.e. how far two equally good bf16 runs are apart. Prints the
   largest relative difference of the raw curves and of their 10-step moving means over the
   last 50 steps, fp8 against bf16 and the control against bf16.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from train_throughput import SHAPE_7B  # noqa: E402

SHAPE_7B_8L = dict(SHAPE_7B, num_layers=8)


def layer_gemms(shape: dict) -> dict:
    """(in, out) of the four linear layers of a decoder layer of ``shape``."""
    h, f, kv = shape["hidden_size"], shape["ffn_hidden_size"], shape["kv_channels"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_query_groups"]) * kv
    return {"qkv": (h, qkv), "proj": (shape["num_attention_heads"] * kv, h), "fc1": (h, 2 * f), "fc2": (f, h)}


def timed(fn, device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def naive_cast(x: torch.Tensor, dtype) -> tuple:
    """amax + scale + clamp + cast as separate PyTorch ops (what the fused kernel replaces)."""
    from megatron_ualm.kernels import fp8_cast
    scale = fp8_cast.scale_from_amax(x.abs().amax().float().reshape(1), fp8_cast.FP8_MAX[dtype])
    return (x.float() * scale).clamp(-fp8_cast.FP8_MAX[dtype], fp8_cast.FP8_MAX[dtype]).to(dtype), scale.reciprocal()


def part_gemm(args, device) -> dict:
    from megatron_ualm.kernels import fp8_cast
    from megatron_ualm.kernels.wgrad import wgrad_gemm_accum_fp32
    from megatron_ualm.model import fp8
    from train_throughput import FULL, TINY
    shapes = {"tiny": TINY} if args.tiny else {"1.5b": FULL, "7b": SHAPE_7B_8L}
    tokens = 64 if args.tiny else 8192
    iters = 3 if args.tiny else 20
    out = {}
    for name, shape in shapes.items():
        for layer, (n_in, n_out) in layer_gemms(shape).items():
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(tokens, n_in, device=device, generator=g, dtype=torch.bfloat16)
            w = (torch.randn(n_out, n_in, device=device, generator=g) * 0.02).to(torch.bfloat16)
            dy = torch.randn(tokens, n_out, device=device, generator=g, dtype=torch.bfloat16) * 1e-3
            flop = 2.0 * tokens * n_in * n_out
            state = fp8.new_state(device)
            x8, x_inv = fp8.cast_scaled(x, state, fp8.INPUT, "delayed")
            w8, w_inv = fp8.cast_scaled(w, state, fp8.WEIGHT, "delayed")
            r = {"tokens": tokens, "in": n_in, "out": n_out}
            r["bf16_fwd_ms"] = timed(lambda: x @ w.t(), device, iters)
            r["fp8_fwd_gemm_ms"] = timed(lambda: fp8_cast.scaled_mm(x8, w8.t(), x_inv, w_inv, torch.bfloat16, True),
                                         device, iters)
            r["cast_delayed_ms"] = timed(lambda: fp8.cast_scaled(x, state, fp8.INPUT, "delayed"), device, iters)
            r["cast_current_ms"] = timed(lambda: fp8.cast_scaled(x, state, fp8.INPUT, "current"), device, iters)
            r["cast_naive_ms"] = timed(lambda: naive_cast(x, fp8_cast.E4M3), device, iters)
            wcast = fp8.WeightCast()
            r["weight_cast_transpose_ms"] = timed(lambda: wcast.refresh(w, state, "delayed"), device, iters)
            r["bf16_tflops"] = flop / r["bf16_fwd_ms"] / 1e9
            r["fp8_tflops"] = flop / r["fp8_fwd_gemm_ms"] / 1e9

            main_grad = torch.zeros(n_out, n_in, device=device, dtype=torch.float32)
            xr = x.detach().requires_grad_()
            wr = w.detach().requires_grad_()

            def bf16_layer():  # megatron's math: y = x W^T; dx = dy W; main_grad += dy^T x
                y = xr.detach() @ wr.detach().t()
                dx = dy @ wr.detach()
                wgrad_gemm_accum_fp32(xr.detach(), dy, main_grad)
                return y, dx

            def fp8_layer(recipe, st):
                wc = fp8.WeightCast()

                def run():
                    wc.stale = True  # one micro-batch per optimizer step: the weight is cast every call
                    y = fp8.fp8_linear(xr, wr, None, st, recipe, main_grad, weight_cast=wc)
                    y.backward(dy)
                    xr.grad = None
                return run

            r["bf16_layer_fwd_bwd_ms"] = timed(bf16_layer, device, iters)
            for recipe in fp8.RECIPES:
                r[f"fp8_{recipe}_layer_fwd_bwd_ms"] = timed(fp8_layer(recipe, fp8.new_state(device)),
                                                            device, iters)
            r["speedup_delayed"] = r["bf16_layer_fwd_bwd_ms"] / r["fp8_delayed_layer_fwd_bwd_ms"]
            r["speedup_current"] = r["bf16_layer_fwd_bwd_ms"] / r["fp8_current_layer_fwd_bwd_ms"]
            out[f"{name}/{layer}"] = r
            print(f"gemm {name:4s} {layer:4s} [{tokens}x{n_in}]x[{n_in}x{n_out}]: fwd bf16 {r['bf16_fwd_ms']:.3f} ms "
                  f"({r['bf16_tflops']:.0f} TF/s), fp8 {r['fp8_fwd_gemm_ms']:.3f} ms ({r['fp8_tflops']:.0f} TF/s); "
                  f"cast delayed {r['cast_delayed_ms']:.3f} / current {r['cast_current_ms']:.3f} / naive "
                  f"{r['cast_naive_ms']:.3f} ms; weight cast + transpose {r['weight_cast_transpose_ms']:.3f} ms; layer fwd+bwd bf16 {r['bf16_layer_fwd_bwd_ms']:.3f}, fp8 delayed "
                  f"{r['fp8_delayed_layer_fwd_bwd_ms']:.3f} ({r['speedup_delayed']:.2f}x), current "
                  f"{r['fp8_current_layer_fwd_bwd_ms']:.3f} ({r['speedup_current']:.2f}x)", flush=True)
            del x, w, dy, x8, w8, main_grad, xr, wr
            _free(device)
    return out


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reseed(seed: int):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _step_args(args, micro_batch: int, seq: int, fp8_recipe, steps: int, warmup: int, lr: float = 1e-5,
               accumulate: int = 1):
    return SimpleNamespace(bf16=True, seq_length=seq, micro_batch=micro_batch, accumulate=accumulate, steps=steps,
                           warmup=warmup, attention_backend="auto", recompute="none", optimizer="megatron",
                           min_doc=8 if args.tiny else 256, max_doc=32 if args.tiny else 2048, fp8=fp8_recipe,
                           lr=lr, no_cuda_graphs=args.no_cuda_graphs)


def part_step(args, device) -> dict:
    from train_throughput import FULL, TINY, model_flops_per_token, run_ualm
    from megatron_ualm.config import ModelConfig
    from megatron_ualm.model.ualm_model import padded_vocab
    shape_7b = dict(SHAPE_7B_8L, num_layers=args.layers_7b)
    runs = ({"tiny": (TINY, 2, 64)} if args.tiny
            else {"1.5b": (FULL, 2, 4096), f"7b-width-{args.layers_7b}-layers": (shape_7b, 1, 4096)})
    if not args.tiny:
        runs = {k: v for k, v in runs.items() if k.split("-")[0] in args.step_shapes.split(",")}
    out = {}
    for name, (shape, mb, seq) in runs.items():
        flops = model_flops_per_token(shape, padded_vocab(ModelConfig(**shape), 1).size, seq)
        for label, recipe in (("bf16", None), ("fp8", args.recipe)):
            _reseed(1234)
            r = run_ualm(_step_args(args, mb, seq, recipe, 2 if args.tiny else args.steps,
                                    1 if args.tiny else 3, accumulate=args.accumulate), shape, device)
            _free(device)
            r["mfu"] = flops * r["tokens_per_s"] / 1e12 / 989.0
            out[f"{name}/{label}"] = r
            print(f"step {name} {label:4s}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, step "
                  f"{r['step_s'] * 1e3:.1f} ms" + (f" (median {r['median_step_s'] * 1e3:.1f})" if "median_step_s" in r
                                                    else "")
                  + (f", peak {r['peak_reserved_gb']:.1f} GB reserved" if r.get("peak_reserved_gb") else "")
                  + f", loss {r['loss']:.4f}", flush=True)
        out[f"{name}/speedup"] = out[f"{name}/fp8"]["tokens_per_s"] / out[f"{name}/bf16"]["tokens_per_s"]
        print(f"step {name}: fp8 / bf16 = {out[f'{name}/speedup']:.3f}x", flush=True)
    return out


def _moving_mean(values: list, window: int) -> list:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def _rel_diffs(a: list, b: list, tail: int) -> list:
    return [abs(y - x) / abs(x) for x, y in zip(a[-tail:], b[-tail:])]


LOSS_WARMUP, LOSS_LR, LOSS_WINDOWS = 20, 1e-4, (10, 20)


def part_loss(args, device) -> dict:
    from train_throughput import FULL, TINY, MarkovSource, build_ualm, step_of, synthetic_ualm_batch
    shape = dict(TINY if args.tiny else FULL)
    if not args.tiny:
        shape["num_layers"] = args.loss_layers
    seq = 64 if args.tiny else args.loss_seq
    steps = args.loss_steps
    curves = {}
    for label, recipe, seed in (("bf16", None, 1234), ("fp8", args.recipe, 1234), ("bf16_seed2", None, 4321)):
        _reseed(seed)
        model, make_phases = build_ualm(_step_args(args, 2, seq, recipe, steps, 0, lr=LOSS_LR), shape, device)
        g = torch.Generator().manual_seed(7)
        source = MarkovSource(model.vocab, states=64 if args.tiny else 512)
        batches = [synthetic_ualm_batch(model.vocab, 2, seq, device, g, 8 if args.tiny else 128,
                                        32 if args.tiny else 1024, source=source) for _ in range(64)]
        step = step_of(make_phases(batches))
        groups = make_phases.optimizer.param_groups
        t = time.perf_counter()
        losses = []
        for i in range(steps):
            for group in groups:
                group["lr"] = LOSS_LR * min(1.0, (i + 1) / LOSS_WARMUP)
            losses.append(step(i).item())
        curves[label] = losses
        print(f"loss {label:10s}: {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        del model, make_phases, step, batches
        _free(device)
    tail = min(50, steps)
    out = {"shape": shape, "seq_length": seq, "micro_batch": 2, "steps": steps, "lr": LOSS_LR,
           "lr_warmup_steps": LOSS_WARMUP, **curves}
    base_mean = statistics.fmean(curves["bf16"][-tail:])
    for other in ("fp8", "bf16_seed2"):
        raw = _rel_diffs(curves["bf16"], curves[other], tail)
        out[f"{other}_max_rel_diff_last_{tail}"] = max(raw)
        line = f"largest relative difference {max(raw):.2%}"
        for window in LOSS_WINDOWS:
            smooth = _rel_diffs(_moving_mean(curves["bf16"], window), _moving_mean(curves[other], window), tail)
            out[f"{other}_max_rel_diff_{window}_step_mean_last_{tail}"] = max(smooth)
            line += f"; of the {window}-step moving means {max(smooth):.2%}"
        rel_mean = statistics.fmean(curves[other][-tail:]) / base_mean - 1
        out[f"{other}_rel_diff_of_mean_last_{tail}"] = rel_mean
        print(f"loss: {other} against bf16 over the last {tail} steps: {line}; of the mean loss {rel_mean:+.2%}",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, emulated FP8 (smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results")))
    p.add_argument("--parts", default="gemm,step,loss", help="comma list of gemm, step, loss")
    p.add_argument("--recipe", default="delayed", choices=["delayed", "current"], help="FP8 scaling for step/loss")
    p.add_argument("--steps", type=int, default=8, help="timed steps per throughput run (after 3 warm-up)")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step in part step")
    p.add_argument("--layers-7b", type=int, default=16, help="decoder layers of the 7B-width model in part step")
    p.add_argument("--step-shapes", default="1.5b,7b", help="comma list of 1.5b, 7b: the models of part step")
    p.add_argument("--loss-steps", type=int, default=None, help="default 220 (tiny: 4)")
    p.add_argument("--loss-layers", type=int, default=28)
    p.add_argument("--loss-seq", type=int, default=2048)
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager decoder in parts step and loss")
    args = p.parse_args(argv)
    args.loss_steps = args.loss_steps or (4 if args.tiny else 220)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fp8_ab.py: no CUDA GPU; use --tiny for the CPU smoke run")
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device=device.type, seed=1234)
    os.makedirs(args.out, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "recipe": args.recipe}
    t0 = time.perf_counter()
    for part, fn in (("gemm", part_gemm), ("step", part_step), ("loss", part_loss)):
        if part in args.parts.split(","):
            t = time.perf_counter()
            try:
                result[part] = fn(args, device)
            except Exception as e:  # one part's failure (e.g. out of memory) keeps the others' results
                if args.tiny:
                    raise
                result[part] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{part}: FAILED {type(e).__name__}: {e}", flush=True)
                _free(device)
            result[f"{part}_seconds"] = time.perf_counter() - t
            with open(os.path.join(args.out, "fp8_ab.json"), "w") as f:  # after each part: partial results survive
                json.dump(result, f, indent=1)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {os.path.join(args.out, 'fp8_ab.json')}")
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
