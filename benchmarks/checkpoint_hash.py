#!/usr/bin/env python
"""What checksumming every checkpoint file costs, and how long the training loop is stopped
by a synchronous against an asynchronous save; all through the real ``save_checkpoint`` /
``verify_checkpoint`` / ``load_checkpoint``, one process, side by side in one run.

    python benchmarks/checkpoint_hash.py --shape 1.5b                 # one GPU (H100/H200)
    python benchmarks/checkpoint_hash.py --shape 1.5b --model-only    # a CPU box (2 cores, 24 GiB)
    python benchmarks/checkpoint_hash.py --tiny                       # CPU smoke run (CI), seconds

What is saved:
* ``1.5b``: the UALM model on the Qwen2.5-1.5B shape (28 layers, 1536 wide, FFN 8960, 12/2
  heads, vocabulary 160,392 rows padded to 160,512, untied head, K = 8; no audio encoder),
  bf16 weights (Float16Module) in megatron DDP with the distributed optimizer: the checkpoint
  holds the bf16 weights, and fp32 main weights, Adam exp_avg and exp_avg_sq (filled by one
  optimizer step on random gradients), the scheduler and the RNG states: about 14 bytes per
  parameter. ``--model-only``: the bf16 weights alone (no DDP, no optimizer), 2 bytes per
  parameter, which is what fits a 24 GiB CPU box.
* ``tiny``: examples/tiny.yaml's shape (2 layers, 64 wide), fp32, same setup.

Rows printed, each the time the caller waits:
* save, sizes only: ``save_checkpoint(checksums=False)``, the manifest before this change
  (sizes of large files, no hashes); save, checksums: the default, where each rank hashes the
  files it wrote right after writing them, ``--hash-threads`` threads;
* verify: ``verify_checkpoint`` (hash every file, compare), with the files in the page cache
  (just written) and evicted from it (``posix_fadvise(DONTNEED)``: read from the disk);
* load: ``load_checkpoint`` of the checkpoint (verify + megatron's load) from a cold cache;
* async save: ``save_checkpoint(async_saves=...)`` then, as a training loop would, a
  ``poll()`` every 50 ms until it is finished: the loop is stopped for the call plus the
  polls (the last one seals the checkpoint); the files are complete after the last column.
And the speed of sha256 and blake2b on this CPU (why the manifest uses sha256).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "tiny": ("examples/tiny.yaml", ["training.precision=fp32"]),
    "1.5b": ("examples/qwen2.5-1.5b.yaml", ["training.precision=bf16"]),
}


def hash_speed(name: str, threads: int, mib: int = 256) -> float:
    """GB/s of ``hashlib.new(name)`` over ``mib`` MiB, split over ``threads`` threads."""
    data = memoryview(np.random.default_rng(0).bytes(mib * 2**20))
    part = len(data) // threads

    def one(i: int) -> str:
        h = hashlib.new(name)
        for at in range(i * part, (i + 1) * part, 8 * 2**20):
            h.update(data[at:min(at + 8 * 2**20, (i + 1) * part)])
        return h.hexdigest()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))
    return len(data) / (time.perf_counter() - start) / 1e9


def evict(path: Path) -> None:
    """Drop a checkpoint's (clean, fsynced) pages from the page cache: the next read is cold."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_up(directory: Path) -> None:
    """A one-tensor torch_dist save: the first result that megatron's writer queue (a separate
    process) receives makes it import torch (~1.5 s on 2 cores), which no measured save should
    pay (a training run pays it once)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron_ualm.runtime.helper_processes import start_checkpoint_writer_queue
    start_checkpoint_writer_queue()
    directory.mkdir(parents=True)
    dist_checkpointing.save({"x": ShardedTensor.from_rank_offsets("x", torch.zeros(1))}, str(directory))
    shutil.rmtree(directory)


def build(shape: str, model_only: bool, device: str):
    """(config, model chunks, optimizer, scheduler, parameter count) of ``shape``."""
    from megatron_ualm.config import load_config
    from megatron_ualm.runtime import init_runtime
    from megatron_ualm.training.providers import build_model, build_optimizer
    config_file, overrides = SHAPES[shape]
    cfg = load_config(os.path.join(ROOT, config_file), overrides + [
        "model.encoder.kind=none", "training.cuda_graphs=false", "checkpoint.load=null",
        "parallel.use_distributed_optimizer=true", f"parallel.device={device}"])
    runtime = init_runtime(seed=1234, device=device)
    if model_only:  # no DDP gradient buffers, no optimizer: the bf16 weights alone
        from megatron.core.transformer.module import Float16Module
        from megatron_ualm.model.transformer_config import transformer_config_from
        from megatron_ualm.model.ualm_model import build_ualm_model
        tconfig = transformer_config_from(cfg.model, cfg.parallel, cfg.training.precision,
                                          use_cpu_initialization=runtime.is_cpu)
        model = build_ualm_model(cfg.model, tconfig).to(runtime.device)
        chunks = [Float16Module(tconfig, model) if tconfig.bf16 else model]
        optimizer = scheduler = None
    else:
        chunks, tconfig = build_model(cfg, runtime)
        optimizer, scheduler = build_optimizer(cfg, chunks, tconfig)
        generator = torch.Generator(runtime.device).manual_seed(0)
        for chunk in chunks:  # one step on random gradients: Adam's states hold real numbers
            for p in chunk.parameters():
                if getattr(p, "main_grad", None) is not None:
                    p.main_grad.normal_(generator=generator)
        optimizer.step()
        scheduler.step(increment=1)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    return cfg, chunks, optimizer, scheduler, params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    p.add_argument("--tiny", action="store_true", help="--shape tiny --device cpu (smoke run)")
    p.add_argument("--model-only", action="store_true", help="save the weights alone (no optimizer)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dir", default=None, help="where to write (default: a new temporary directory); "
                   "needs room for one checkpoint (1.5b: ~25 GB, --model-only ~3.6 GB)")
    p.add_argument("--hash-threads", type=int, default=None, help="default: all CPUs of this process")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each measurement, alternating (load: once); default 2, --tiny 1")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    if a.tiny:
        a.shape, a.device = "tiny", "cpu"
    a.repeats = a.repeats or (1 if a.tiny else 2)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device

    from megatron_ualm.runtime import shutdown_runtime
    from megatron_ualm.training import checkpoint as ckpt
    from megatron_ualm.training.checkpoint_files import default_hash_threads

    threads = a.hash_threads or default_hash_threads()
    start = time.perf_counter()
    cfg, chunks, optimizer, scheduler, params = build(a.shape, a.model_only, device)
    what = "bf16 weights" if a.model_only else (
        f"{'bf16' if cfg.training.precision == 'bf16' else 'fp32'} weights + distributed Adam "
        "(fp32 main weights, exp_avg, exp_avg_sq) + scheduler + RNG")
    print(f"[checkpoint_hash] {a.shape}: {params / 1e9:.3f} B parameters on {device}, saving {what}; "
          f"built in {time.perf_counter() - start:.0f} s; hash threads {threads}", flush=True)
    work = Path(a.dir or tempfile.mkdtemp(prefix="ckpt_hash_"))
    root = work / "checkpoints"
    warm_up(work / "warm_up")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def save(iteration: int, **kwargs) -> tuple[Path, float]:
        sync()
        t = time.perf_counter()
        path = ckpt.save_checkpoint(root, iteration, chunks, optimizer, scheduler, hash_threads=threads, **kwargs)
        return path, time.perf_counter() - t

    runs: dict[str, list[float]] = {}

    def record(key: str, seconds: float) -> None:
        runs.setdefault(key, []).append(seconds)
        print(f"[checkpoint_hash] {key[:-2]}: {seconds:.2f} s", flush=True)

    iteration = 0
    try:
        for repeat in range(a.repeats):  # A B A B: a drift of the machine hits both alike
            iteration += 1
            path, seconds = save(iteration, checksums=False)
            record("save_sizes_only_s", seconds)
            shutil.rmtree(path)  # one checkpoint on disk at a time (the 1.5B one is ~25 GB)
            iteration += 1
            path, seconds = save(iteration)
            record("save_checksums_s", seconds)
            sizes = [f.stat().st_size for f in path.rglob("*") if f.is_file()]
            for cache in ("warm", "cold"):
                if cache == "cold":
                    evict(path)
                t = time.perf_counter()
                problems = ckpt.verify_checkpoint(path)
                record(f"verify_{cache}_s", time.perf_counter() - t)
                assert not problems, problems
            if repeat == 0:
                evict(path)
                sync()
                t = time.perf_counter()
                ckpt.load_checkpoint(path, chunks, optimizer, scheduler, load_optimizer=optimizer is not None)
                sync()
                record("load_cold_s", time.perf_counter() - t)
            shutil.rmtree(path)

            saves = ckpt.AsyncSaves()
            iteration += 1
            final, call = save(iteration, async_saves=saves)
            returned, polls = time.perf_counter(), 0.0
            while saves.pending:  # the training loop: a step, then a poll
                time.sleep(0.05)
                t = time.perf_counter()
                saves.poll()
                polls += time.perf_counter() - t
            record("async_blocked_s", call + polls)
            record("async_call_s", call)
            record("async_polls_s", polls)
            record("async_complete_after_s", call + time.perf_counter() - returned)
            assert not ckpt.verify_checkpoint(final, contents=False)
            shutil.rmtree(final)
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        shutdown_runtime()

    cpus = len(os.sched_getaffinity(0))
    speeds = {f"{name}_{n}_threads_GBps": hash_speed(name, n) for name in ("sha256", "blake2b") for n in (1, cpus)}
    gb = sum(sizes) / 1e9

    def cell(key: str) -> str:
        values = runs[key]
        return f"{min(values):8.2f}" + (f"   (runs: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else "")

    print(f"checkpoint: {gb:.2f} GB in {len(sizes)} files (largest {max(sizes) / 1e9:.2f} GB); "
          f"seconds, the fastest of {a.repeats} run(s)")
    print(f"{'save, sizes only (manifest before)':42s} {cell('save_sizes_only_s')}")
    print(f"{'save, checksums of every file':42s} {cell('save_checksums_s')}")
    for cache in ("warm", "cold"):
        key = f"verify_{cache}_s"
        print(f"{f'verify (hash all), page cache {cache}':42s} {cell(key)}   {gb / min(runs[key]):.2f} GB/s")
    print(f"{'load_checkpoint (verify + load), cold':42s} {cell('load_cold_s')}")
    print(f"{'sync save: loop stopped':42s} {cell('save_checksums_s')}")
    print(f"{'async save: loop stopped (call + polls)':42s} {cell('async_blocked_s')}")
    print(f"{'  of which the call':42s} {cell('async_call_s')}")
    print(f"{'  of which the polls (the last one seals)':42s} {cell('async_polls_s')}")
    print(f"{'async save: complete after':42s} {cell('async_complete_after_s')}")
    print("hash speed on this CPU, GB/s: " + ", ".join(
        f"{name} {speeds[f'{name}_1_threads_GBps']:.2f} (1 thread) / {speeds[f'{name}_{cpus}_threads_GBps']:.2f} "
        f"({cpus} threads)" for name in ("sha256", "blake2b")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "model_only": a.model_only, "device": device, "parameters": params,
                       "checkpoint_bytes": sum(sizes), "files": len(sizes), "hash_threads": threads,
                       "runs_s": runs, **speeds}, f, indent=1)
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer starts processes that import this file
    raise SystemExit(main())
