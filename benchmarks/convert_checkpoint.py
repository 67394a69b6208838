#!/usr/bin/env python
"""Conversion time and peak memory for a Qwen2.5-1.5B-shaped random checkpoint (bf16).

    python benchmarks/convert_checkpoint.py [--workdir /tmp/ualm_convert_bench] [--keep]

Steps, each in its own process so its memory is measured alone:
  1. write a random HF checkpoint of the 1.5B shape (bf16, tied embeddings, ~3.1 GB),
     streamed tensor by tensor;
  2. HF -> Megatron (K=8, C=1024, no audio encoder);
  3. Megatron -> HF;
  4. check the export against the source, tensor by tensor (bit-exact).
Memory: peak resident set (VmHWM; includes file pages mapped by safetensors, which the
kernel can drop) and peak anonymous memory (RssAnon sampled every 20 ms: what the process
really allocated). Checks free disk space first (needs about 3.5x the checkpoint).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)


class MemorySampler:
    """Peak RssAnon of this process, sampled in a thread."""

    def __init__(self, period=0.02):
        self.peak_kb, self.period, self._stop = 0, period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status("RssAnon"))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_random_hf(directory):
    import torch
    from transformers import Qwen2Config
    from megatron_ualm.convert.hf_io import TensorSpec, write_sharded
    from megatron_ualm.convert.layout import hf_shapes
    from megatron_ualm.model.hf_adapter import qwen2_shape
    os.makedirs(directory)
    config = Qwen2Config(**QWEN25_15B, architectures=["Qwen2ForCausalLM"])
    config.dtype = torch.bfloat16
    config.to_json_file(os.path.join(directory, "config.json"))
    shapes = hf_shapes(qwen2_shape(config.to_dict()), qkv_bias=True, tied=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for spec in specs:
            t = torch.empty(spec.shape, dtype=torch.float32).normal_(0, 0.02, generator=gen)
            yield spec.name, t.to(torch.bfloat16)
    write_sharded(directory, specs, tensors(), max_shard_bytes=5 * 1024 ** 3)


def verify(src, exported):
    import torch
    from megatron_ualm.convert.hf_io import HFCheckpoint
    with HFCheckpoint(src) as a, HFCheckpoint(exported) as b:
        names = set(a.names) | {"lm_head.weight"}
        assert set(b.names) == names, set(b.names) ^ names
        for n in sorted(names):
            ref = a.get("model.embed_tokens.weight" if n == "lm_head.weight" else n)
            assert torch.equal(ref, b.get(n)), n
    return len(names)


def phase(name, work):
    """Child process: run one step, print its figures as JSON."""
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    with MemorySampler() as mem:
        info = {
            "make_hf": lambda: make_random_hf(os.path.join(work, "hf")),
            "hf_to_megatron": lambda: _to_megatron(work),
            "megatron_to_hf": lambda: _to_hf(work),
            "verify": lambda: {"tensors_equal": verify(os.path.join(work, "hf"), os.path.join(work, "hf_out"))},
        }[name]()
    print(json.dumps({"phase": name, "seconds": round(time.time() - start, 1),
                      "peak_rss_gib": round(_status("VmHWM") / 2 ** 20, 2),
                      "peak_anon_gib": round(mem.peak_kb / 2 ** 20, 2), "info": info}))


def _to_megatron(work):
    from megatron_ualm.config import UALMConfig
    from megatron_ualm.convert import convert_hf_to_megatron
    cfg = UALMConfig()
    cfg.model.encoder.kind = "none"
    report = convert_hf_to_megatron(os.path.join(work, "hf"), os.path.join(work, "meg"), cfg, show_progress=False)
    print(report.format(), file=sys.stderr)


def _to_hf(work):
    from megatron_ualm.convert import convert_megatron_to_hf
    report = convert_megatron_to_hf(os.path.join(work, "meg"), os.path.join(work, "hf_out"), show_progress=False)
    print(report.format(), file=sys.stderr)


def _du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/ualm_convert_bench")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        phase(args.phase, args.workdir)
        return 0
    need = int(3.1e9 * 3.5)
    os.makedirs(os.path.dirname(os.path.abspath(args.workdir)), exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.workdir))).free
    if free < need:
        print(f"not enough disk: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB", file=sys.stderr)
        return 1
    shutil.rmtree(args.workdir, ignore_errors=True)
    results = []
    try:
        for name in ("make_hf", "hf_to_megatron", "megatron_to_hf", "verify"):
            out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--phase", name],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        sizes = {d: round(_du(os.path.join(args.workdir, d)) / 1e9, 2) for d in ("hf", "meg", "hf_out")}
        print(f"checkpoint sizes (GB): {sizes}; machine: {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM")
        print(f"{'phase':<16}{'seconds':>9}{'peak RSS GiB':>14}{'peak anon GiB':>15}")
        for r in results:
            print(f"{r['phase']:<16}{r['seconds']:>9}{r['peak_rss_gib']:>14}{r['peak_anon_gib']:>15}")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
