#!/usr/bin/env python
"""Measured GPU memory of the 7B width against the memory budget (``training/memory_budget.py``).

    python benchmarks/memory_7b.py --json benchmarks/results/memory_7b.json   # one H100/H200, ~4 min
    python benchmarks/memory_7b.py --tiny --device cpu                        # CPU smoke run (CI)

1. Measured: the Qwen2.5-7B width (hidden 3584, ffn 18944, 28 query / 4 KV heads of 128,
   vocabulary 152,064 text rows + UALM's special and codebook rows; ``fp8_ab.SHAPE_7B_8L``)
   with ``--layers`` decoder layers (default 4 and 8) at TP=1 on one GPU, for recompute
   none / selective / full, micro-batch 1, seq 4096: ``train_throughput.py``'s UALM step as the
   trainer runs it (Float16Module bf16 weights, megatron DDP with fp32 grad buffers, the
   distributed optimizer; no audio encoder; synthetic packed text + audio rows). Recorded:
   tokens/s, ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the timed
   steps, and the budget's prediction for the same config on one GPU. The table prints the
   measured and predicted peak (prediction without and with the fixed ``RESERVE_BYTES``
   allowance) and the per-layer slope between the two layer counts, where layer-independent
   terms cancel. CUDA graphs are off by default (the budget does not model graph pools;
   ``--cuda-graphs`` turns them on, as the trainer does at TP=PP=1 without recompute).
2. Predicted only: the full 28-layer 7B at the candidate 8-GPU layouts on ``--gpu-gib`` (80)
   GiB (``--candidate-seq``, 4096): DP=8 TP=1 with recompute none / selective / full, TP=2+SP DP=4, TP=4+SP DP=2,
   PP=2 DP=4 (global batch 512, micro-batch 1, seq 4096, the Qwen2.5-Omni audio encoder
   frozen as in examples/qwen2.5-7b.yaml).

GiB = 2^30 bytes throughout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

GIB = 1024 ** 3
RECOMPUTE = ("none", "selective", "full")
#: (label, TP, PP, SP, recompute) of the candidate 8-GPU layouts for the 28-layer 7B
CANDIDATES = (("DP=8 TP=1", 1, 1, False, "none"), ("DP=8 TP=1", 1, 1, False, "selective"),
              ("DP=8 TP=1", 1, 1, False, "full"), ("DP=4 TP=2+SP", 2, 1, True, "selective"),
              ("DP=2 TP=4+SP", 4, 1, True, "selective"), ("DP=4 PP=2", 1, 2, False, "selective"))


def run_config(shape: dict, recompute: str, seq: int, micro_batch: int):
    """The UALMConfig of one measured run (world size 1): what the budget is asked about."""
    from megatron_ualm.config import DataConfig, EncoderConfig, ModelConfig, TrainingConfig, UALMConfig
    model = ModelConfig(**shape, max_position_embeddings=max(seq, 32768), recompute=recompute,
                        encoder=EncoderConfig(kind="none"))
    return UALMConfig(model=model, data=DataConfig(seq_length=seq),
                      training=TrainingConfig(micro_batch_size=micro_batch, global_batch_size=micro_batch))


def candidate_config(tp: int, pp: int, sp: bool, recompute: str, seq: int):
    """The 28-layer 7B as examples/qwen2.5-7b.yaml trains it, at one candidate layout."""
    from fp8_ab import SHAPE_7B_8L as shape
    from megatron_ualm.config import load_config
    from megatron_ualm.training.memory_budget import with_layout
    cfg = load_config(os.path.join(ROOT, "examples", "qwen2.5-7b.yaml"),
                      [f"data.seq_length={seq}", "training.micro_batch_size=1", "training.global_batch_size=512"])
    assert (cfg.model.hidden_size, cfg.model.ffn_hidden_size, cfg.model.num_attention_heads) == (
        shape["hidden_size"], shape["ffn_hidden_size"], shape["num_attention_heads"])
    return with_layout(cfg, tp, pp, sp, recompute)


def step_args(args, recompute: str) -> SimpleNamespace:
    """train_throughput.build_ualm's arguments: the trainer's step (megatron optimizer, fused CE,
    compiled fusions, host plan), one micro-batch per step."""
    return SimpleNamespace(bf16=True, seq_length=args.seq_length, micro_batch=args.micro_batch, accumulate=1,
                           steps=args.steps, warmup=args.warmup, attention_backend="auto", recompute=recompute,
                           optimizer="megatron", min_doc=args.min_doc, max_doc=args.max_doc, fp8=None, lr=1e-5,
                           no_cuda_graphs=not args.cuda_graphs)


def measure(args, device) -> list:
    from train_throughput import run_ualm
    from megatron_ualm.training import memory_budget as mb
    rows = []
    for layers in args.layers:
        shape = {**args.shape, "num_layers": layers}
        for recompute in RECOMPUTE:
            torch.manual_seed(1234)
            r = run_ualm(step_args(args, recompute), shape, device)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            budget = mb.memory_budget(run_config(shape, recompute, args.seq_length, args.micro_batch), 1,
                                      int(args.gpu_gib * GIB))
            worst = budget.worst
            rows.append({
                "layers": layers, "recompute": recompute, "tokens_per_s": r["tokens_per_s"],
                "allocated_gib": None if r["peak_gb"] is None else r["peak_gb"] * 1e9 / GIB,
                "reserved_gib": None if r["peak_reserved_gb"] is None else r["peak_reserved_gb"] * 1e9 / GIB,
                "predicted_gib": (worst.total - mb.RESERVE_BYTES) / GIB,
                "predicted_with_reserve_gib": worst.total / GIB,
                "predicted_terms_gib": {k: v / GIB for k, v in worst.terms.items()},
                "params": r["params"],
            })
            print(f"measured {layers} layers, recompute {recompute}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    return rows


def slopes(rows: list, layers: list) -> dict:
    """Per-layer GiB between the smallest and largest layer count, per recompute mode."""
    lo, hi = min(layers), max(layers)
    out = {}
    if lo == hi:
        return out
    for recompute in RECOMPUTE:
        a = next(r for r in rows if r["layers"] == lo and r["recompute"] == recompute)
        b = next(r for r in rows if r["layers"] == hi and r["recompute"] == recompute)
        per = {}
        for key in ("allocated_gib", "reserved_gib", "predicted_gib"):
            per[key] = None if a[key] is None else (b[key] - a[key]) / (hi - lo)
        out[recompute] = per
    return out


def fmt(v, spec="8.2f") -> str:
    return f"{'n/a':>8s}" if v is None else format(v, spec)


def predict_candidates(args) -> list:
    from megatron_ualm.training import memory_budget as mb
    out = []
    for label, tp, pp, sp, recompute in CANDIDATES:
        b = mb.memory_budget(candidate_config(tp, pp, sp, recompute, args.candidate_seq), 8,
                             int(args.gpu_gib * GIB))
        out.append({"layout": label, "tp": tp, "pp": pp, "sp": sp, "recompute": recompute,
                    "worst_stage": b.worst.stage, "worst_gib": b.worst.total / GIB, "margin_gib": b.margin / GIB,
                    "fits": b.fits, "terms_gib": {k: v / GIB for k, v in b.worst.terms.items()},
                    "notes": b.notes})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, CPU-friendly (CI smoke run)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--layers", default=None, help="comma-separated decoder layer counts (default 4,8; tiny 1,2)")
    p.add_argument("--seq-length", type=int, default=None, help="default 4096 (tiny 64)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 4; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory of the 8-GPU prediction (GiB)")
    p.add_argument("--candidate-seq", type=int, default=4096, help="sequence of the 8-GPU prediction (default 4096)")
    p.add_argument("--cuda-graphs", action="store_true", help="decoder CUDA graphs on (recompute none only)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from fp8_ab import SHAPE_7B_8L
    from train_throughput import TINY
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.shape = dict(TINY if args.tiny else SHAPE_7B_8L)
    args.layers = [int(n) for n in (args.layers or ("1,2" if args.tiny else "4,8")).split(",")]
    args.seq_length = args.seq_length or (64 if args.tiny else 4096)
    args.steps = args.steps or (1 if args.tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.min_doc, args.max_doc = (8, 32) if args.tiny else (256, 2048)
    if device.type == "cpu" and not args.tiny:
        print("warning: the 7B width on CPU is very slow; use --tiny", file=sys.stderr)

    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.memory_budget import RESERVE_BYTES
    init_runtime(device=device.type, seed=1234)
    rows = measure(args, device)
    per_layer = slopes(rows, args.layers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{'tiny' if args.tiny else '7B'} width, seq {args.seq_length}, micro-batch {args.micro_batch}, TP=1, "
          f"one device ({name}); GiB; predicted = the budget without / with its {RESERVE_BYTES / GIB:.0f} GiB reserve")
    print(f"{'layers':>6s} {'recompute':>9s} {'tokens/s':>10s} {'allocated':>9s} {'reserved':>9s} "
          f"{'predicted':>9s} {'+reserve':>9s}")
    for r in rows:
        print(f"{r['layers']:6d} {r['recompute']:>9s} {r['tokens_per_s']:10,.0f} {fmt(r['allocated_gib'], '9.2f')} "
              f"{fmt(r['reserved_gib'], '9.2f')} {r['predicted_gib']:9.2f} {r['predicted_with_reserve_gib']:9.2f}")
    if per_layer:
        print(f"per layer ({min(args.layers)} -> {max(args.layers)} layers):")
        for recompute, s in per_layer.items():
            print(f"  {recompute:9s} allocated {fmt(s['allocated_gib'], '.3f')}  reserved {fmt(s['reserved_gib'], '.3f')}"
                  f"  predicted {s['predicted_gib']:.3f}")
    candidates = predict_candidates(args)
    print(f"\nbudget of the 28-layer 7B on 8 x {args.gpu_gib:.0f} GiB (seq {args.candidate_seq}, micro-batch 1, "
          "global batch 512):")
    for c in candidates:
        print(f"  {c['layout']:14s} recompute={c['recompute']:9s} worst rank {c['worst_gib']:6.2f} GiB  "
              f"margin {c['margin_gib']:+6.2f}  {'FITS' if c['fits'] else 'DOES NOT FIT'}")
    for note in dict.fromkeys(n for c in candidates for n in c["notes"]):
        print(f"  note: {note}")
    if args.json:
        out = {k: v for k, v in vars(args).items()}
        with open(args.json, "w") as f:
            json.dump({"args": out, "device": name, "measured": rows, "per_layer": per_layer,
                       "candidates_8gpu": candidates}, f, indent=2)
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
