#!/usr/bin/env python
"""DPO training-step throughput beside the pre-training step's, in one run, one process.

    python benchmarks/dpo_step.py                 # Qwen2.5-1.5B shape, seq 4096, mb 2, bf16, one GPU
    python benchmarks/dpo_step.py --tiny          # CPU smoke run (tiny shape)

Both steps go through the trainer's own ``loop.train_step`` (megatron's schedule, DDP, the
distributed optimizer) on the same model and optimizer, fed the same text-to-audio examples:
the LM step packs them one by one (``PackedRows``), the DPO step packs them as (chosen,
rejected) pairs (``PairedRows``, a pair never split) and adds the per-document log-prob
reduction and the pair loss. Examples are synthetic caption_to_audio conversations: a
caption of 16..48 tokens and 4..10 s of 8-codebook audio at 50 frames/s (tiny: shorter).
Printed: tokens/s (real, packed tokens) and step time of each, and their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = ["model.num_layers=28", "model.hidden_size=1536", "model.ffn_hidden_size=8960",
        "model.num_attention_heads=12", "model.num_query_groups=2", "model.encoder.kind=none",
        "training.precision=bf16", "parallel.device=cuda"]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.text_vocab_size=300", "model.num_codebooks=4", "model.codebook_size=16",
        "model.encoder.kind=none", "training.precision=fp32", "parallel.device=cpu",
        "parallel.use_distributed_optimizer=false"]


class Pairs:
    """In-memory stand-in for ``data.pair_rows.PairSource`` (and, per side, a dataset)."""

    def __init__(self, vocab, n, frames, seed):
        from megatron_ualm.formats import build_segments
        from megatron_ualm.formats import templates as T
        rng = np.random.default_rng(seed)
        K, C = vocab.num_codebooks, vocab.codebook_size
        self.prefix, self.start, self.reference = "synthetic", 0, np.zeros((n, 2))
        self.docs = []
        for _ in range(n):
            cap = rng.integers(1, 300, size=int(rng.integers(16, 49))).tolist()
            self.docs.append([build_segments([T.Message("user", "text", cap), T.Message(
                "assistant", "audio", rng.integers(0, C, size=(K, int(rng.integers(*frames)))))], vocab)
                for _ in range(2)])
        self._rows = np.array([[T.num_rows(s, K) for s in d] for d in self.docs])

    def __len__(self):
        return len(self.docs)

    def rows(self):
        return self._rows.sum(1) - 1

    def pair(self, i):
        return tuple(self.docs[i])


class Singles:
    """The same examples one by one, for the LM step."""

    def __init__(self, pairs: Pairs):
        self.p = pairs

    def __len__(self):
        return 2 * len(self.p)

    def rows(self):
        return self.p._rows.reshape(-1)

    def segments(self, i):
        return self.p.docs[i // 2][i % 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU")
    ap.add_argument("--seq-length", type=int, default=None, help="rows per packed sequence (4096; tiny 256)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4, help="per step (gradient accumulation)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from megatron_ualm.config import load_config
    from megatron_ualm.data.loader import PackedRows, collate
    from megatron_ualm.data.pair_rows import PairedRows
    from megatron_ualm.model.ualm_model import padded_vocab
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.loop import train_step
    from megatron_ualm.training.metrics import packed_lengths
    from megatron_ualm.training.providers import build_model, build_optimizer, row_settings

    seq = args.seq_length or (256 if args.tiny else 4096)
    b, m = args.micro_batch, args.micro_batches
    cfg = load_config(None, (TINY if args.tiny else FULL) + [
        f"data.seq_length={seq}", f"training.micro_batch_size={b}", f"training.global_batch_size={b * m}",
        "training.train_iters=1000000", "optimizer.warmup_iters=1", "training.cuda_graphs=false"])
    rt = init_runtime(device=cfg.parallel.device, seed=1)
    try:
        chunks, tconfig = build_model(cfg, rt)
        optimizer, scheduler = build_optimizer(cfg, chunks, tconfig)
        vocab = padded_vocab(cfg.model, 1)
        frames = (10, 30) if args.tiny else (200, 500)
        pairs = Pairs(vocab, 40 if args.tiny else 400, frames, seed=0)
        settings = dataclasses.replace(row_settings(cfg), cfg_dropout_prob=0.0)
        lm_rows = PackedRows([Singles(pairs)], [1.0], [1], vocab, settings, num_rows=0, blend=False)
        dpo_rows = PairedRows([pairs], [1.0], [1], vocab, settings, num_rows=0, blend=False)
        results = {}
        for name, rows, objective, glue in (("pretraining", lm_rows, "lm", collate),
                                            ("dpo", dpo_rows, "dpo", dpo_rows.collate)):
            run_cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, objective=objective))
            steps = []
            for s in range(args.steps + 2):
                batches = [glue([rows[(s * m * b + i * b + j) % len(rows)] for j in range(b)]) for i in range(m)]
                tokens = sum(packed_lengths(x["document_ids"])[0] for x in batches)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                total, _, status = train_step(run_cfg, chunks, optimizer, scheduler, batches, rt.device, seq)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                if s >= 2:
                    steps.append((time.perf_counter() - start, tokens))
            seconds = sum(t for t, _ in steps)
            results[name] = {"tokens_per_s": sum(n for _, n in steps) / seconds, "step_s": seconds / len(steps),
                             "fill": sum(n for _, n in steps) / (len(steps) * m * b * seq),
                             "last_loss": float(total[0] / max(float(total[1]), 1.0)) if total is not None else None}
        results["dpo_vs_pretraining"] = results["dpo"]["tokens_per_s"] / results["pretraining"]["tokens_per_s"]
        results["shape"] = "tiny" if args.tiny else "qwen2.5-1.5b"
        results["device"] = torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu"
        for name in ("pretraining", "dpo"):
            r = results[name]
            print(f"{name:12s} {r['tokens_per_s']:12,.0f} tok/s  {r['step_s'] * 1e3:9.1f} ms/step  fill {r['fill']:.1%}")
        print(f"dpo / pretraining tokens/s: {results['dpo_vs_pretraining']:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
