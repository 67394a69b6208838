"""Is the training step CPU-bound? Per phase, the CPU time to issue the work against the GPU
time to run it, on one GPU.

For each phase of a UALM step (zero grads, forward + loss, backward, finalize + optimizer)
the GPU is first kept busy with a sleep kernel, so the CPU issues the whole phase without
ever waiting for the GPU: the CPU's wall time for the call is its issue time, and the CUDA
events around the phase's work (queued behind the sleep) give the GPU's time with no gaps.
A phase whose CPU time exceeds its GPU time leaves the GPU waiting by about the difference
in a normal step (less where an earlier phase built up a lead). A host sync inside a phase
shows as a CPU time of about the sleep itself. Caveat (H200, torch 2.11): the backward's
issue time reads higher than the whole measured step allows (a deep queue of pending launches
behind the sleep seems to slow them), so trust it for the forward and compare within a run.

    python benchmarks/host_overhead.py [--accumulate N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--sleep-ms", type=float, default=400.0, help="GPU sleep before each phase")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-clip-in-adam", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead.py needs a CUDA GPU")
        return 0
    from types import SimpleNamespace

    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    device = torch.device("cuda")
    init_runtime(device="cuda", seed=1234)
    args = SimpleNamespace(bf16=True, seq_length=4096, micro_batch=2, attention_backend="auto", recompute="none",
                           optimizer="megatron", accumulate=a.accumulate, min_doc=256, max_doc=2048,
                           no_clip_in_adam=a.no_clip_in_adam)
    model, make_phases = tt.build_ualm(args, tt.FULL, device)
    phases = make_phases(tt.ualm_batches(args, model, device))
    step = tt.step_of(phases, a.accumulate)
    for i in range(3):
        step(i)
    torch.cuda.synchronize()

    # cycles per ms of the sleep kernel, measured
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)

    def named_phases():
        yield "zero grads", phases.zero_grad
        for j in range(a.accumulate):
            yield f"forward {j}" if a.accumulate > 1 else "forward", lambda j=j: phases.forward(j)
            yield f"backward {j}" if a.accumulate > 1 else "backward", phases.backward
        yield "finalize + optimizer", phases.optimizer

    rows = {}
    for _ in range(a.repeats):
        for name, fn in named_phases():
            torch.cuda.synchronize()
            torch.cuda._sleep(int(a.sleep_ms * cycles_per_ms))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            fn()
            cpu_ms = (time.perf_counter() - t) * 1e3
            end.record()
            torch.cuda.synchronize()
            rows.setdefault(name, []).append((cpu_ms, start.elapsed_time(end)))
    print(f"{torch.cuda.get_device_name()}; UALM 1.5B shape, 4096 x 2 packed, {a.accumulate} micro-batch(es) "
          f"per step; GPU sleep {a.sleep_ms:.0f} ms before each phase; median of {a.repeats}")
    print(f"{'phase':24s} {'CPU issue ms':>13s} {'GPU run ms':>11s}   CPU - GPU")
    result, cpu_total, gpu_total = {}, 0.0, 0.0
    for name, values in rows.items():
        cpu = sorted(v[0] for v in values)[len(values) // 2]
        gpu = sorted(v[1] for v in values)[len(values) // 2]
        cpu_total, gpu_total = cpu_total + cpu, gpu_total + gpu
        flag = "  (waited for the GPU: a host sync or a full launch queue)" if cpu > 0.8 * a.sleep_ms else ""
        print(f"{name:24s} {cpu:13.1f} {gpu:11.1f}   {cpu - gpu:+8.1f}{flag}")
        result[name] = {"cpu_ms": cpu, "gpu_ms": gpu}
    print(f"{'step':24s} {cpu_total:13.1f} {gpu_total:11.1f}   {cpu_total - gpu_total:+8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(a), "phases": result}, f, indent=1)
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
