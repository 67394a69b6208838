#!/usr/bin/env python
"""One training run of the real trainer at a given layout, for multi-GPU checks.

    torchrun --nproc-per-node 4 benchmarks/multi_gpu.py --shape tiny --tp 2 --pp 2 \\
        --iters 50 --data /tmp/ualm-data --exp /tmp/runs/tiny-tp2pp2
    ... --resume-from /tmp/runs/tiny-tp2pp2/checkpoints/iter_0000050  (another layout)

Synthetic tokenized datasets (text, text-to-audio codes) are written once to --data for the
shape's vocabulary. The run's per-step losses, tokens/s and memory end up in
``<exp>/logs/metrics.jsonl``; the driver ``benchmarks/gpu_multi.sh`` compares layouts.
The same global batch is used at every layout, so step-1 losses are comparable.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    # tiny: 4 query groups so that TP=4 divides them
    "tiny": dict(config="examples/tiny.yaml", text_rows=512, seq=512, mbs=2, gbs=8,
                 overrides=["model.num_query_groups=4", "training.precision=bf16"]),
    "1.5b": dict(config="examples/qwen2.5-1.5b.yaml", text_rows=151_936, seq=4096, mbs=2, gbs=8,
                 overrides=[]),
    # the paper's backbone; run it with --tp 2 (or more): its weights and fp32 Adam states
    # (~18 bytes per parameter) do not fit one 80 GB GPU
    "7b": dict(config="examples/qwen2.5-7b.yaml", text_rows=152_064, seq=4096, mbs=1, gbs=8,
               overrides=[]),
}


def write_data(root: str, text_rows: int, n: int = 400, seed: int = 0) -> dict:
    from megatron_ualm.data.indexed import FORMAT_NAME, FORMAT_VERSION, DocumentWriter
    from megatron_ualm.formats import UnifiedVocab, build_segments
    from megatron_ualm.formats import templates as T

    vocab = UnifiedVocab(text_rows, 8, 1024)
    rng = np.random.default_rng(seed)
    out = {}
    for task in ("text_only", "caption_to_audio"):
        prefix = os.path.join(root, task)
        out[task] = prefix
        if os.path.exists(prefix + ".meta.json"):
            continue
        w = DocumentWriter(prefix, with_audio=False)
        for _ in range(n):
            q = rng.integers(1, text_rows, size=int(rng.integers(20, 200))).tolist()
            if task == "text_only":
                msgs = [T.Message("user", "text", q), T.Message("assistant", "text", q[::-1][:100])]
            else:
                codes = rng.integers(0, 1024, size=(8, int(rng.integers(50, 500))))
                msgs = [T.Message("user", "text", q), T.Message("assistant", "audio", codes)]
            w.add_document(build_segments(msgs, vocab))
        w.finalize({"format": FORMAT_NAME, "version": FORMAT_VERSION, "task": task,
                    "vocab": {"tokenizer_length": text_rows, "num_codebooks": 8, "codebook_size": 1024},
                    "counts": {"documents": n}})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--data", required=True)
    p.add_argument("--exp", required=True)
    p.add_argument("--resume-from", default=None, help="a checkpoint dir to continue from (copied into --exp)")
    p.add_argument("--save", action="store_true", help="save a checkpoint at the end")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    shape = SHAPES[a.shape]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        write_data(a.data, shape["text_rows"])
        if a.resume_from:
            dst = os.path.join(a.exp, "checkpoints", os.path.basename(a.resume_from.rstrip("/")))
            if not os.path.exists(dst):
                shutil.copytree(a.resume_from, dst)
    import torch.distributed as dist  # noqa: F401  (ranks wait for rank 0's files below)
    import time
    for _ in range(600):
        if os.path.exists(os.path.join(a.data, "caption_to_audio.meta.json")) and (
                not a.resume_from or os.path.exists(os.path.join(a.exp, "checkpoints"))):
            break
        time.sleep(0.5)

    from megatron_ualm.config import load_config
    from megatron_ualm.training.loop import pretrain
    train = (f"[{{path: {a.data}/text_only, task: text_only, weight: 2}}, "
             f"{{path: {a.data}/caption_to_audio, task: caption_to_audio, weight: 1}}]")
    cfg = load_config(os.path.join(ROOT, shape["config"]), [
        f"data.train={train}", "data.valid=[]", f"model.text_vocab_size={shape['text_rows']}",
        "model.encoder.kind=none", "checkpoint.load=null", f"checkpoint.experiment_dir={a.exp}",
        f"checkpoint.save_interval={a.iters}", f"checkpoint.save_at_end={str(a.save).lower()}",
        f"data.seq_length={shape['seq']}", "data.num_workers=2", "data.cfg_dropout_prob=0.0",
        f"training.micro_batch_size={shape['mbs']}", f"training.global_batch_size={shape['gbs']}",
        f"training.train_iters={a.iters}", "training.log_interval=1", "training.eval_interval=100000",
        "optimizer.warmup_iters=5", f"parallel.tensor_parallel={a.tp}", f"parallel.pipeline_parallel={a.pp}",
        f"parallel.sequence_parallel={'true' if a.tp > 1 else 'false'}", "parallel.device=auto",
        "logging.tensorboard=false", "paths.tokenizer=null", "paths.codec=null", "paths.backbone=null",
        *shape["overrides"], *a.overrides])
    if not a.save:
        cfg.checkpoint.save_interval = 10**9
    pretrain(cfg)


if __name__ == "__main__":
    main()
