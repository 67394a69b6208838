#!/usr/bin/env python
"""Where the exact (fp32) codec path loses against a plain ``XcodecModel.encode`` batch.

All variants encode the same clips (64 x 10 s, batches of 32, random default-config X-Codec)
in the same process, one after the other, A B A B, and report x real time, the share of codes
equal to the exact reference (fp32, TF32 off, cuDNN's default algorithms) and whether a
clip's codes in a batch equal its codes alone:

  plain-tf32         model.encode with TF32 for convolutions and matmuls
  plain-conv-tf32    model.encode under torch's defaults (TF32 for cuDNN convolutions only)
  plain-exact        model.encode with TF32 off for convolutions and matmuls
  plain-exact-bench  the same with cudnn.benchmark (cuDNN times its fp32 algorithms)
  tool-exact         megatron_ualm's Codec.encode (the data tools' path), fp32 exact
  tool-exact-bench   Codec.encode with cudnn_benchmark=True
  tool-tf32          Codec.encode with allow_tf32=True (convolutions and matmuls)

Then a CUDA profile of the exact path: time by kernel family (convolution, GEMM, other).

    python benchmarks/codec_overhead.py --device cuda --json-out benchmarks/results/x/codec.json
    python benchmarks/codec_overhead.py --tiny            # CPU smoke run
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _codec_module():
    # Loaded by path: the GPU machines have no soundfile, which megatron_ualm.audio imports.
    spec = importlib.util.spec_from_file_location("ualm_codec", os.path.join(ROOT, "megatron_ualm", "audio", "codec.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def backend_flags(tf32: bool, benchmark: bool):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out")
    a = p.parse_args()
    device = torch.device(a.device)
    C = _codec_module()
    if a.tiny:
        a.clips, a.seconds, a.batch_size = min(a.clips, 8), min(a.seconds, 1.0), min(a.batch_size, 4)
    codec = C.Codec("tiny" if a.tiny else "random-default", device=a.device,
                    model=C.build_tiny_codec() if a.tiny else C.random_default_codec())
    model = codec.model

    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(int(a.seconds * 16000))).astype(np.float32) for _ in range(a.clips)]
    audio_s = a.clips * a.seconds

    @torch.inference_mode()
    def plain(tf32, bench):
        def run():
            out = []
            with backend_flags(tf32, bench):
                for s in range(0, len(clips), a.batch_size):
                    x = torch.from_numpy(np.stack(clips[s:s + a.batch_size]))[:, None].to(device)
                    out += list(model.encode(x, return_dict=False).to("cpu", torch.int32).numpy())
            return out
        return run

    @torch.inference_mode()
    def plain_defaults():
        def run():
            out = []
            for s in range(0, len(clips), a.batch_size):
                x = torch.from_numpy(np.stack(clips[s:s + a.batch_size]))[:, None].to(device)
                out += list(model.encode(x, return_dict=False).to("cpu", torch.int32).numpy())
            return out
        return run

    def tool(tf32, bench):
        def run():
            codec.allow_tf32, codec.cudnn_benchmark = tf32, bench
            return codec.encode(clips, a.batch_size)
        return run

    variants = {"plain-tf32": plain(True, False), "plain-conv-tf32": plain_defaults(),
                "plain-exact": plain(False, False), "plain-exact-bench": plain(False, True),
                "tool-exact": tool(False, False), "tool-exact-bench": tool(False, True),
                "tool-tf32": tool(True, False)}
    with backend_flags(False, False):
        reference = plain(False, False)()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "clips": a.clips, "clip_seconds": a.seconds,
               "batch_size": a.batch_size, "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
               "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32, "runs": {}}
    for name, fn in variants.items():
        fn()  # warm-up (and cuDNN's timing for the -bench variants)
    for r in range(a.rounds):
        for name, fn in variants.items():
            sync(device)
            t = time.perf_counter()
            codes = fn()
            sync(device)
            dt = time.perf_counter() - t
            run = results["runs"].setdefault(name, {"x_realtime": []})
            run["x_realtime"].append(round(audio_s / dt, 1))
            run["codes_equal_to_exact"] = round(float(np.mean([np.mean(x == y) for x, y in zip(codes, reference)])), 5)
            print(f"round {r + 1} {name:18s} {audio_s / dt:8.1f}x real time, codes equal to exact "
                  f"{run['codes_equal_to_exact']:.5f}", flush=True)
    # a clip alone vs in its batch, for the exact variants
    for name, (tf32, bench) in {"tool-exact": (False, False), "tool-exact-bench": (False, True)}.items():
        codec.allow_tf32, codec.cudnn_benchmark = tf32, bench
        alone = [codec.encode([c])[0] for c in clips[:4]]
        batched = codec.encode(clips[:a.batch_size], a.batch_size)[:4]
        results["runs"][name]["batch_equals_alone"] = round(float(np.mean([np.mean(x == y) for x, y in zip(alone, batched)])), 5)

    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        codec.allow_tf32, codec.cudnn_benchmark = False, False
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            codec.encode(clips[:a.batch_size], a.batch_size)
            sync(device)
        families = {"convolution": 0.0, "gemm": 0.0, "other": 0.0}
        top = []
        for e in prof.key_averages():
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if not us or e.key.startswith("aten::") or e.key.startswith("cuda"):
                continue
            k = e.key.lower()
            fam = "convolution" if ("conv" in k or "implicit" in k or "winograd" in k or "fft" in k) else \
                  "gemm" if ("gemm" in k or "sgemm" in k or "cutlass" in k or "matmul" in k) else "other"
            families[fam] += us
            top.append((us, e.key[:90]))
        total = sum(families.values())
        results["profile_exact_ms"] = {k: round(v / 1e3, 2) for k, v in families.items()}
        results["profile_exact_share"] = {k: round(v / total, 3) for k, v in families.items()} if total else {}
        results["profile_top_kernels"] = [(round(us / 1e3, 2), k) for us, k in sorted(top, reverse=True)[:12]]
        print(json.dumps({"profile_ms": results["profile_exact_ms"], "top": results["profile_top_kernels"]}, indent=1))
    print(json.dumps(results["runs"], indent=1))
    if a.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
