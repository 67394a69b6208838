"""Score every pair of the run's preference sets with the frozen reference checkpoint, once,
and store the numbers beside each set (``data.pair_rows``: ``P.reference.<key>.npy``, float64
[N, 2] = log pi_ref of chosen and rejected, and ``.json`` naming the checkpoint and dataset).

The model is built, loaded and run exactly as the trainer does (``providers.build_model``,
``checkpoint.load_checkpoint``, ``loop.forward_step`` under megatron's forward-only schedule),
at any TP/PP/DP, in eval mode and without classifier-free-guidance dropout. Pairs are scored in
chunks of ``chunk_pairs``; each finished chunk is written atomically under
``P.reference.<key>.parts/``, so a rerun after a kill scores only what is missing and gives
the same numbers (a chunk's rows depend on its pairs alone).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ualm.data.pair_rows import PairedRows, PairSource, collate_pairs, reference_key, reference_paths
from megatron_ualm.fileutil import write_atomic
from megatron_ualm.model.ualm_model import padded_vocab
from megatron_ualm.runtime import init_runtime, shutdown_runtime
from megatron_ualm.training import checkpoint as ckpt
from megatron_ualm.training.dpo import checkpoint_identity, logps_loss_func, reference_checkpoint
from megatron_ualm.training.loop import forward_step
from megatron_ualm.training.preflight import resolve_named_checkpoint
from megatron_ualm.training.providers import (build_model, data_parallel_info, is_logging_rank, row_settings,
                                              task_id)


@dataclass
class ScoreOptions:
    """Options of ``python -m megatron_ualm.score_reference`` beside the run config."""
    chunk_pairs: int = 256           # pairs scored and written together (the unit of resuming)


def preference_prefixes(cfg) -> list[str]:
    """Every preference set of data.train and data.valid, once each, in config order."""
    out = []
    for spec in [*cfg.data.train, *cfg.data.valid]:
        if spec.task == "preference" and spec.path not in out:
            out.append(spec.path)
    return out


def score_reference(cfg, options: ScoreOptions = ScoreOptions()) -> list[str]:
    """Score the preference sets of ``cfg`` (a ``UALMConfig`` with training.objective=dpo) with
    its reference checkpoint; returns the .npy paths (all ranks)."""
    p = cfg.parallel
    runtime = init_runtime(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel,
                           p.context_parallel, seed=cfg.training.seed,
                           device=None if p.device == "auto" else p.device)
    try:
        return _score_all(cfg, runtime, options)
    finally:
        shutdown_runtime()


def _say(text: str) -> None:
    if is_logging_rank():
        print(f"[ualm] {text}", flush=True)


def _score_all(cfg, runtime, options: ScoreOptions) -> list[str]:
    path = reference_checkpoint(cfg)
    resolve_named_checkpoint(path, "dpo.reference_checkpoint" if cfg.dpo.reference_checkpoint else "checkpoint.load")
    identity = checkpoint_identity(path)
    cfg = replace(cfg, training=replace(cfg.training, cuda_graphs=False))
    chunks, _ = build_model(cfg, runtime)
    ckpt.load_checkpoint(path, chunks, None, None, strict=False, load_optimizer=False, load_rng=False,
                         expand_vocab=cfg.checkpoint.expand_vocab, new_rows_seed=cfg.training.seed)
    for c in chunks:
        c.eval()
    _say(f"reference: {identity['path']} (iteration {identity['iteration']})")
    vocab = padded_vocab(cfg.model, 1)
    written = []
    for prefix in preference_prefixes(cfg):
        written.append(_score_set(cfg, chunks, PairSource(prefix, vocab), identity, runtime.device, options))
    return written


def _score_set(cfg, chunks, source: PairSource, identity: dict, device, options: ScoreOptions) -> str:
    fingerprint = source.fingerprint()
    key = reference_key(identity, fingerprint)
    npy, meta = reference_paths(source.prefix, key)
    if os.path.exists(npy) and os.path.exists(meta):
        _say(f"{npy}: already scored")
        return npy
    parts = f"{source.prefix}.reference.{key}.parts"
    size = options.chunk_pairs
    num_chunks = math.ceil(len(source) / size)

    def part(c):
        return os.path.join(parts, f"chunk-{c:06d}.npy")

    todo = [c for c in range(num_chunks) if not os.path.exists(part(c))]  # before anyone writes
    dist.barrier()
    writer = is_logging_rank()
    if writer:
        os.makedirs(parts, exist_ok=True)
    start = time.perf_counter()
    progress = None
    if writer:
        from tqdm import tqdm
        remaining = sum(min(size, len(source) - c * size) for c in todo)
        progress = tqdm(total=len(source), initial=len(source) - remaining,
                        desc=f"scoring {os.path.basename(source.prefix)}", unit="pair")
    for c in todo:
        values = score_pairs(cfg, chunks, source.subset(c * size, (c + 1) * size), device)
        if writer:
            _save_npy(part(c), values)
            progress.update(len(values))
    if progress is not None:
        progress.close()
    dist.barrier()
    if writer:
        values = np.concatenate([np.load(part(c)) for c in range(num_chunks)])
        _save_npy(npy, values)
        info = {"format": "ualm-dpo-reference", "version": 1, "pairs": len(source), "checkpoint": identity,
                "dataset": fingerprint, "prefix": os.path.abspath(source.prefix), "cfg_dropout": "off",
                "columns": ["chosen", "rejected"],
                "reduction": "sum over audio target rows and all streams of w * log p (SPEC section 5 weights)"}
        write_atomic(meta, (json.dumps(info, indent=1) + "\n").encode(), f"{meta}.tmp{os.getpid()}")
        shutil.rmtree(parts, ignore_errors=True)
        better = float(np.mean(values[:, 0] > values[:, 1])) if len(values) else 0.0
        _say(f"{npy}: {len(values)} pairs in {time.perf_counter() - start:.1f} s; mean log pi_ref chosen "
             f"{values[:, 0].mean():.3f}, rejected {values[:, 1].mean():.3f}; reference prefers chosen in "
             f"{better:.1%} of pairs")
    dist.barrier()
    return npy


def _save_npy(path: str, values: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float64))
    write_atomic(path, buf.getvalue(), f"{path}.tmp{os.getpid()}")


def score_pairs(cfg, chunks, source: PairSource, device) -> np.ndarray | None:
    """float64 [len(source), 2] log pi of each pair's (chosen, rejected) under ``chunks``, on
    the logging rank (None elsewhere). Call on every rank together."""
    settings = replace(row_settings(cfg, seed_offset=1), cfg_dropout_prob=0.0)
    rows = PairedRows([source], [1.0], [task_id("preference")], padded_vocab(cfg.model, 1), settings,
                      num_rows=0, blend=False)
    dp_rank, dp = data_parallel_info()
    b = cfg.training.micro_batch_size
    per_step = b * dp
    batches = []
    for m in range(math.ceil(len(rows) / per_step)):
        picked = []
        for j in range(b):
            r = m * per_step + dp_rank * b + j
            row = rows[r] if r < len(rows) else rows[0]
            if r >= len(rows):  # a filler, so every rank runs the same micro-batches: ignored
                row = {**row, "pair_index": np.full_like(row["pair_index"], -1)}
            picked.append(row)
        batches.append(collate_pairs(picked))
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=partial(forward_step, device, loss=logps_loss_func),
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks, num_microbatches=len(batches), seq_length=cfg.data.seq_length,
            micro_batch_size=b, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    out = torch.zeros(len(source), 2, dtype=torch.float64, device=device)
    for rep in reports:
        index = rep["pair_index"].to(device)
        valid = index >= 0
        out[index[valid] - source.start] = rep["logps"][valid].to(device)
    dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
    return out.cpu().numpy() if is_logging_rank() else None


__all__ = ["ScoreOptions", "score_reference", "score_pairs", "preference_prefixes"]
