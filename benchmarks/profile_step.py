#!/usr/bin/env python
"""Time and profile UALM's training step (as training runs it) on one GPU, by category.

    python benchmarks/profile_step.py --json out.json                 # the model as it is
    python benchmarks/profile_step.py --reference --json ref.json     # speed-ups off
    python benchmarks/profile_step.py --shapes 4096x2:packed,4096x2:unpacked,8192x1:packed

One process builds the 1.5B-shaped model once (Float16Module + DDP fp32 grads + distributed
optimizer, ``train_throughput.build_ualm``) and, for each shape ``SEQxMB:packed|unpacked``, times
``--steps`` steps after ``--warmup`` and reports tokens/s, MFU and peak memory; the first
shape is then profiled (``torch.profiler``, ``--profile-steps`` steps) and its GPU time is
broken down:

* by model part: ranges the model opens while a profiler runs (``kernels.profiling.scope``:
  ualm.embed / attention / norm / swiglu / rope / head) and the step's own (ualm.loss,
  ualm.zero_grad, ualm.finalize_grads, ualm.optimizer); backward kernels are attributed to
  the forward range of the op that made their autograd node (profiler sequence numbers);
* GEMMs by kernel name (cuBLAS / CUTLASS) outside the head; ``AccumulateGrad`` hooks (DDP
  adding each bf16 weight gradient into its fp32 main_grad) as "DDP / grad copies";
* idle: profiled wall time on the GPU minus the union of kernel (and copy) intervals, i.e.
  time the GPU waits for the CPU.
Also the top kernels by time. Results go to ``--json`` (plus a Chrome trace with ``--trace``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import train_throughput as ms  # noqa: E402

GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|sm90_|sm80_|ampere_|cublas|splitk", re.I)
ATTN = re.compile(r"flash|fmha|cudnn|attention|flex", re.I)
SCOPES = {
    "ualm.embed": "embedding",
    "ualm.attention": "attention",
    "ualm.norm": "elementwise: RMSNorm",
    "ualm.swiglu": "elementwise: SwiGLU",
    "ualm.rope": "elementwise: RoPE",
    "ualm.head": "head + CE",
    "ualm.loss": "head + CE",
    "ualm.zero_grad": "DDP / grad copies",
    "ualm.finalize_grads": "DDP / grad copies",
    "ualm.optimizer": "optimizer",
}


def _scope_of(evt) -> str | None:
    while evt is not None:
        if evt.name in SCOPES:
            return evt.name
        evt = evt.cpu_parent
    return None


def _backward_node(evt):
    """The autograd node event (with a sequence number) this backward op runs under."""
    while evt is not None:
        if evt.name.startswith("autograd::engine::evaluate_function:"):
            return evt
        evt = evt.cpu_parent
    return None


class _CpuKernel:  # CPU runs (smoke test): leaf ops stand in for kernels
    def __init__(self, e):
        self.name, self.duration = e.name, e.self_cpu_time_total


def _kernels(e, on_cpu: bool):
    if not on_cpu:
        return e.kernels
    return [_CpuKernel(e)] if not e.cpu_children else []


def breakdown(prof, steps: int, on_cpu: bool = False) -> dict:
    from torch.autograd import DeviceType
    events = prof.events()
    fwd_scope = {}
    for e in events:
        if e.device_type == DeviceType.CPU and getattr(e, "sequence_nr", -1) >= 0 and _backward_node(e) is None:
            s = _scope_of(e)
            if s is not None:
                fwd_scope.setdefault(e.sequence_nr, s)
    cats: dict[str, float] = defaultdict(float)
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0, ""])
    for e in events:
        if e.device_type != DeviceType.CPU or not _kernels(e, on_cpu):
            continue
        scope = _scope_of(e)
        node = _backward_node(e)
        if scope is None and node is not None:
            if "AccumulateGrad" in node.name:
                scope = "ualm.finalize_grads"
            else:
                inner = node
                for c in node.cpu_children:  # the node's own range carries the sequence number
                    if getattr(c, "sequence_nr", -1) >= 0:
                        inner = c
                        break
                scope = fwd_scope.get(getattr(inner, "sequence_nr", -1)) or fwd_scope.get(
                    getattr(node, "sequence_nr", -1))
        for k in _kernels(e, on_cpu):
            name = k.name
            if scope == "ualm.head" or scope == "ualm.loss":
                cat = "head + CE: GEMM" if GEMM.search(name) else "head + CE: softmax/CE/select"
            elif scope in SCOPES:
                cat = SCOPES[scope]
            elif ATTN.search(name):
                cat = "attention"
            elif GEMM.search(name):
                cat = "GEMM (layers)"
            elif node is not None:
                cat = "other elementwise (bwd: residual, copies)"
            else:
                cat = "other elementwise (fwd: residual, copies)"
            cats[cat] += k.duration
            kernels[name][0] += k.duration
            kernels[name][1] += 1
            kernels[name][2] = cat
    # GPU busy time (union of device intervals) vs the profiled span
    # Device activity: kernels, copies, memsets. The profiler also puts each record_function
    # range on the GPU timeline ("gpu_user_annotation", named like the CPU range); those spans
    # cover the gaps between kernels and must not count as busy time.
    cpu_names = {e.name for e in events if e.device_type == DeviceType.CPU}
    device = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in cpu_names]
    intervals = busy_intervals(device)
    # device work the categories above miss: device events not linked to any CPU op
    device_by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in device:
        device_by_name[e.name][0] += e.time_range.end - e.time_range.start
        device_by_name[e.name][1] += 1
    unlinked = sorted(((n, v[0] - kernels[n][0] if n in kernels else v[0], v[1] - (kernels[n][1] if n in kernels else 0))
                       for n, v in device_by_name.items()), key=lambda t: -t[1])
    unlinked = [(n, us, c) for n, us, c in unlinked if us > 1.0][:15]
    busy = sum(end - start for start, end in intervals)
    window = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    try:
        gaps = idle_gaps(events, device, intervals)
    except Exception as e:  # the breakdown above stays useful without the gap analysis
        print(f"idle-gap analysis failed: {e!r}", file=sys.stderr)
        gaps = {"by_phase": {}, "largest": []}
    total_kernel = sum(cats.values())
    per_step = {k: v / steps / 1e3 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    # the CPU side: time inside each ualm.* range (inclusive) and the ops with the most own time
    scope_cpu: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("ualm."):
            scope_cpu[e.name][0] += e.cpu_time_total
            scope_cpu[e.name][1] += 1
    own_cpu = sorted(((a.key, a.self_cpu_time_total, a.count) for a in prof.key_averages()
                      if not a.key.startswith("ualm.")), key=lambda t: -t[1])[:25]
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "ms_per_step": per_step,
        "kernel_ms_per_step": total_kernel / steps / 1e3,
        "unlinked_device_ms_per_step": sum(us for _, us, _ in unlinked) / steps / 1e3,
        "unlinked_device_events": [{"name": n[:160], "ms_per_step": us / steps / 1e3, "calls_per_step": c / steps}
                                   for n, us, c in unlinked],
        "gpu_busy_ms_per_step": busy / steps / 1e3,
        "gpu_window_ms_per_step": window / steps / 1e3,
        "idle_ms_per_step": (window - busy) / steps / 1e3,
        "top_kernels": [{"name": n[:160], "ms_per_step": v[0] / steps / 1e3, "calls_per_step": v[1] / steps,
                         "category": v[2]} for n, v in top],
        "idle_ms_per_step_by_phase": {k: v / steps / 1e3 for k, v in sorted(
            gaps["by_phase"].items(), key=lambda kv: -kv[1])},
        "largest_gaps": gaps["largest"],
        "cpu_ms_per_step_by_scope": {k: {"ms": v[0] / steps / 1e3, "calls": v[1] / steps}
                                     for k, v in sorted(scope_cpu.items(), key=lambda kv: -kv[1][0])},
        "top_cpu_ops": [{"name": n[:120], "self_cpu_ms_per_step": us / steps / 1e3, "calls_per_step": c / steps}
                        for n, us, c in own_cpu],
    }


PHASES = ("ualm.zero_grad", "ualm.forward", "ualm.loss", "ualm.backward", "ualm.finalize_grads", "ualm.optimizer")


def busy_intervals(device_events) -> list[tuple[float, float]]:
    """The union of the events' time ranges as sorted, disjoint (start, end) intervals."""
    intervals: list[tuple[float, float]] = []
    for start, end in sorted((e.time_range.start, e.time_range.end) for e in device_events):
        if intervals and start <= intervals[-1][1]:
            intervals[-1] = (intervals[-1][0], max(intervals[-1][1], end))
        else:
            intervals.append((start, end))
    return intervals


def idle_gaps(events, device, intervals, min_us: float = 20.0, top: int = 25) -> dict:
    """Where the GPU waits for the CPU: each gap between busy device intervals is charged to
    the step phase (``PHASES``) the CPU was in when the gap ended (when the next kernel got
    launched), and the largest gaps are listed with the innermost CPU op running at their
    middle (what the CPU was busy with) and the kernels either side."""
    from torch.autograd import DeviceType
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in zip(intervals, intervals[1:]) if b[0] - a[1] >= min_us]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    phases = [e for e in cpu if e.name in PHASES]

    def phase_at(t):
        for e in phases:
            if e.time_range.start <= t <= e.time_range.end:
                return e.name
        return "between steps / outside phases"

    def innermost_at(t):
        best = None
        for e in cpu:
            r = e.time_range
            if r.start <= t <= r.end and (best is None or r.end - r.start < best.time_range.end - best.time_range.start):
                best = e
        return best

    def kernel_near(t, before):
        cands = [e for e in device if
                 (abs(e.time_range.end - t) < 1 if before else abs(e.time_range.start - t) < 1)]
        return cands[0].name[:70] if cands else "?"

    by_phase: dict[str, float] = defaultdict(float)
    for length, g0, g1 in gaps:
        by_phase[phase_at(g1)] += length
    largest = []
    for length, g0, g1 in sorted(gaps, reverse=True)[:top]:
        op = innermost_at((g0 + g1) / 2)
        chain, e = [], op
        while e is not None and len(chain) < 4:
            chain.append(e.name[:50])
            e = e.cpu_parent
        largest.append({"us": round(length, 1), "phase": phase_at(g1), "cpu_ops": " < ".join(chain),
                        "kernel_before": kernel_near(g0, True), "kernel_after": kernel_near(g1, False)})
    return {"by_phase": dict(by_phase), "largest": largest}


def print_breakdown(b: dict, title: str) -> None:
    print(f"\n-- {title}: GPU time per step by category (ms) --")
    for k, v in b["ms_per_step"].items():
        print(f"  {k:45s} {v:8.2f}")
    print(f"  {'kernels total':45s} {b['kernel_ms_per_step']:8.2f}")
    print(f"  {'GPU busy (union)':45s} {b['gpu_busy_ms_per_step']:8.2f}")
    print(f"  {'GPU idle (waiting for the CPU)':45s} {b['idle_ms_per_step']:8.2f}")
    print(f"  {'device time linked to no CPU op (uncounted)':45s} {b.get('unlinked_device_ms_per_step', 0):8.2f}")
    for t in b.get("unlinked_device_events", [])[:10]:
        print(f"      {t['ms_per_step']:7.2f} ms {t['calls_per_step']:6.0f}x  {t['name'][:90]}")
    print("-- GPU idle by step phase (ms; the phase the CPU was in when work resumed) --")
    for k, v in b.get("idle_ms_per_step_by_phase", {}).items():
        print(f"  {k:45s} {v:8.2f}")
    print("-- largest idle gaps (us, phase, CPU op at the gap's middle < its parents) --")
    for g in b.get("largest_gaps", [])[:15]:
        print(f"  {g['us']:8.0f} {g['phase']:20s} {g['cpu_ops'][:110]}")
        print(f"  {'':8s} {'':20s} after {g['kernel_before'][:45]} | before {g['kernel_after'][:45]}")
    print("-- CPU time per step inside each range (ms, inclusive; the profiler slows the CPU) --")
    for k, v in b.get("cpu_ms_per_step_by_scope", {}).items():
        print(f"  {k:45s} {v['ms']:8.2f}  ({v['calls']:.0f} calls)")
    print("-- CPU ops with the most own time per step (ms) --")
    for t in b.get("top_cpu_ops", [])[:20]:
        print(f"  {t['self_cpu_ms_per_step']:7.2f} ms {t['calls_per_step']:6.0f}x  {t['name'][:100]}")
    print(f"-- top kernels --")
    for t in b["top_kernels"][:20]:
        print(f"  {t['ms_per_step']:7.2f} ms {t['calls_per_step']:6.0f}x  [{t['category'][:22]:22s}] {t['name'][:90]}")


def find_syncs(step, device) -> list:
    """Run one step with torch's CUDA sync debug mode on and return each place (Python stack,
    innermost frames first) that made the host wait for the device, with its count."""
    import traceback
    import warnings
    sites: dict[str, int] = defaultdict(int)
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        where = " < ".join(f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else os.path.basename(f.filename)}"
                           f":{f.lineno}" for f in reversed(frames[-5:]))
        sites[where] += 1

    ms.sync(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(0)
            ms.sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    return sorted(([n, w] for w, n in sites.items()), reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x2:packed", help="comma list of SEQxMB:packed|unpacked")
    p.add_argument("--model", default="1.5b", choices=["1.5b", "7b"], help="Qwen2.5-1.5B or -7B widths")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    p.add_argument("--fp8", default=None, choices=["delayed", "current"], help="FP8 GEMMs (training.fp8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=2, help="0: no profile")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--recompute", default="none")
    p.add_argument("--reference", action="store_true", help="the speed-ups off (train_throughput.py --reference)")
    p.add_argument("--no-fused-ce", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-fast-optimizer", action="store_true")
    p.add_argument("--no-wgrad-fusion", action="store_true")
    p.add_argument("--no-host-plan", action="store_true")
    p.add_argument("--no-clip-in-adam", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="eager decoder. With the graphs on, the profiler ties every kernel of a replayed graph "
                        "to the graph launch, so the per-category split is unreliable (kernels, busy and idle "
                        "totals stay right); profile with this flag for the categories")
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (smoke test of this script)")
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default=None, help="also write a Chrome trace of the profiled steps")
    p.add_argument("--sync-debug", action="store_true",
                   help="also list where one step makes the host wait for the GPU (CUDA only)")
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.tiny else "cuda")

    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device=device.type, seed=1234)
    shapes = []
    for item in a.shapes.split(","):
        size, kind = item.split(":")
        seq, mb = (int(v) for v in size.split("x"))
        shapes.append((seq, mb, kind))
    args = SimpleNamespace(bf16=True, seq_length=max(s for s, _, _ in shapes), micro_batch=shapes[0][1],
                           attention_backend=a.attention_backend, recompute=a.recompute, optimizer="megatron",
                           reference=a.reference, no_fused_ce=a.no_fused_ce, no_compile=a.no_compile,
                           no_fast_optimizer=a.no_fast_optimizer,
                           no_wgrad_fusion=a.no_wgrad_fusion, no_host_plan=a.no_host_plan, no_clip_in_adam=a.no_clip_in_adam,
                           no_cuda_graphs=a.no_cuda_graphs, accumulate=a.accumulate, steps=a.steps, warmup=a.warmup,
                           min_doc=256, max_doc=2048, fp8=a.fp8)
    shape = dict(ms.TINY if a.tiny else {"1.5b": ms.FULL, "7b": ms.SHAPE_7B}[a.model])
    if a.layers:
        shape["num_layers"] = a.layers
    args.bf16 = not a.tiny
    t0 = time.perf_counter()
    model, make_phases = ms.build_ualm(args, shape, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model built in {time.perf_counter() - t0:.1f} s; {name}; "
          f"{'reference' if a.reference else 'speed-ups on'}", flush=True)
    results = {"device": name, "args": vars(a), "runs": {}}
    for i, (seq, mb, kind) in enumerate(shapes):
        args.seq_length, args.micro_batch = seq, mb
        args.min_doc, args.max_doc = (256, 2048) if kind == "packed" else (seq, seq)
        if model.decoder_graph is not None:
            model.decoder_graph.reset()  # capture for this shape
        batches = ms.ualm_batches(args, model, device)
        step = ms.step_of(make_phases(batches), a.accumulate)
        ms.sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t1 = time.perf_counter()
        try:
            r = ms._time(step, args, device)
        except torch.OutOfMemoryError as e:
            print(f"{seq}x{mb} {kind}: out of memory ({str(e)[:200]})", flush=True)
            results["runs"][f"{seq}x{mb}:{kind}"] = {"oom": True}
            batches = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        flops = ms.model_flops_per_token(shape, model.vocab.size, seq)
        r["tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] / ms.PEAK_TFLOPS
        r["flops_per_token"] = flops
        print(f"{seq}x{mb} {kind:8s} {r['tokens_per_s']:>9,.0f} tokens/s {r['tflops']:6.1f} TFLOP/s "
              f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gb'] or 0:.1f} GB (reserved {r['peak_reserved_gb'] or 0:.1f})  step {1e3 * r['step_s']:.1f} ms  "
              f"loss {r['loss']:.3f}  (incl. warmup {time.perf_counter() - t1:.0f} s)", flush=True)
        if i == 0 and a.profile_steps > 0:
            from torch.profiler import ProfilerActivity, profile
            ms.sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for j in range(a.profile_steps):
                    step(j)
                ms.sync(device)
            r["breakdown"] = breakdown(prof, a.profile_steps, on_cpu=device.type == "cpu")
            print_breakdown(r["breakdown"], f"{seq}x{mb} {kind}")
            if model.decoder_graph is not None and model.decoder_graph.captured:
                print("  (decoder CUDA graphs on: the categories put a replayed graph's kernels wherever the profiler "
                      "ties them; run with --no-cuda-graphs for the split. Busy and idle totals hold.)")
            if a.trace:
                prof.export_chrome_trace(a.trace)
            if a.sync_debug and device.type == "cuda":
                r["syncs"] = find_syncs(step, device)
                print(f"-- host syncs in one step: {sum(n for n, _ in r['syncs'])} --")
                for n, where in r["syncs"][:20]:
                    print(f"  {n:4d}x  {where[:150]}")
        results["runs"][f"{seq}x{mb}:{kind}"] = r
        batches = step = None
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
