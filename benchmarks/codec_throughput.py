#!/usr/bin/env python
"""Codec throughput: seconds of audio encoded per second (x real time), one clip at a time vs
equal-length batches, fp32 vs bf16, and the training-step time that offline codes save.

    python benchmarks/codec_throughput.py --tiny                     # CPU smoke run
    python benchmarks/codec_throughput.py --device cuda --clips 64   # X-Codec-sized random model
    python benchmarks/codec_throughput.py --device cuda --codec /models/xcodec

Without --codec or --tiny the model is ``XcodecModel(XcodecConfig())`` with random weights
(160.7M parameters, the real architecture; throughput does not depend on the weights).

"Work saved": the public reference runs the codec inside every training forward pass. With
S rows per sequence, B sequences per step and a share g of rows that are generated audio
(codec frames at 50/s), each step re-encodes S*B*g/50 seconds of audio; offline codes remove
that from every step of every epoch. The step time to compare against is --step-seconds
(default: 4096 x 2 rows at 35.6k rows/s, the HF Qwen2.5-1.5B figure on one H200 from
ENVIRONMENT.md).
"""
import argparse
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
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats):
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random codec (CPU smoke test)")
    p.add_argument("--codec", help="local XcodecModel directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", type=int, default=None, help="clips per measurement (default 64 GPU / 8 CPU)")
    p.add_argument("--seconds", type=float, default=None, help="clip length (default 10 GPU / 2 CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtypes", default="fp32,fp32-tf32,bf16",
                   help="fp32 (exact, TF32 off), fp32-tf32, bf16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gen-share", type=float, default=0.33, help="share of rows that are generated audio")
    p.add_argument("--step-seconds", type=float, default=4096 * 2 / 35_600)
    p.add_argument("--json-out")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.clips or (64 if gpu else 8)
    seconds = args.seconds or (10.0 if gpu else 2.0)
    C = _codec_module()
    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(n)]
    audio_s = n * seconds
    results = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "clips": n,
               "clip_seconds": seconds, "batch_size": args.batch_size, "runs": []}

    fp32_codes = None
    for dtype in args.dtypes.split(","):
        variant, dtype = dtype, dtype.split("-")[0]
        tf32 = variant.endswith("-tf32")
        if variant != "fp32" and not gpu:
            continue  # bf16 convolutions on CPU are slow and not what anyone would run
        if args.tiny:
            codec = C.Codec("tiny", device=args.device, dtype=dtype, allow_tf32=tf32)
        elif args.codec:
            codec = C.Codec(args.codec, device=args.device, dtype=dtype, allow_tf32=tf32)
        else:
            codec = C.Codec("random-default", device=args.device, dtype=dtype, allow_tf32=tf32,
                            model=C.random_default_codec())
        params = sum(p.numel() for p in codec.model.parameters())
        one = min(n, 16 if gpu else 4)
        t_alone, alone = _timed(lambda: [codec.encode([c])[0] for c in clips[:one]], device, args.repeats)
        t_batch, codes = _timed(lambda: codec.encode(clips, args.batch_size), device, args.repeats)
        # does a clip get the same codes in a batch as alone? (kernels can differ by batch size)
        batched_same = float(np.mean([np.mean(a == b) for a, b in zip(alone, codes)]))
        run = {"dtype": variant, "params_M": round(params / 1e6, 2), "K": codec.num_codebooks,
               "frames_per_clip": int(codes[0].shape[1]),
               "alone_x_realtime": round(one * seconds / t_alone, 1),
               "batched_x_realtime": round(audio_s / t_batch, 1),
               "batched_codes_equal_alone": round(batched_same, 5)}
        if variant == "fp32":
            fp32_codes = codes
        elif fp32_codes is not None:
            same = np.mean([np.mean(a == b) for a, b in zip(codes, fp32_codes)])
            first = np.mean([np.mean(a[0] == b[0]) for a, b in zip(codes, fp32_codes)])
            run["codes_equal_to_fp32"] = round(float(same), 4)
            run["codebook0_equal_to_fp32"] = round(float(first), 4)
        # training-step work the offline codes save (per step, per GPU)
        audio_per_step = args.seq_length * args.micro_batch * args.gen_share / 50.0
        codec_s = audio_per_step / run["batched_x_realtime"]
        run["online_codec_s_per_step"] = round(codec_s, 4)
        run["online_overhead_pct"] = round(100 * codec_s / args.step_seconds, 1)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        del codec
        if gpu:
            torch.cuda.empty_cache()
    print(f"device {results['device']}: {n} clips x {seconds:g} s; step model: {args.seq_length} x "
          f"{args.micro_batch} rows, {args.gen_share:.0%} generated audio, {args.step_seconds:.3f} s/step")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
