#!/usr/bin/env python
"""Text preprocessing throughput: documents/s and tokens/s of data_tools/preprocess_text.py.

    python benchmarks/preprocess_text.py --docs 20000 --workers 2

Generates a JSONL of chat documents (~1,528 characters on average, like the Megatron-LM anchor
in ENVIRONMENT.md), trains a 32k byte-level BPE on part of it (cached in --workdir), then runs
the real command line in a subprocess and reports whole-process wall time (imports included,
as the anchor figures are) and the in-loop rate printed by the tool.
"""
import argparse
import json
import resource
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_corpus(path: str, docs: int, mean_chars: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)))) for _ in range(30000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            n_words = max(4, int(rng.normal(mean_chars / 6.2, mean_chars / 20)))
            ws = rng.choice(len(words), size=n_words, p=zipf)
            text = " ".join(words[w] for w in ws)
            cut = len(text) // 3
            f.write(json.dumps({"input": [{"role": "user", "content": text[:cut]}],
                                "output": text[cut:]}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--chars", type=int, default=1528)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workers", type=int, action="append", help="repeatable; default 2")
    p.add_argument("--workdir", default="/tmp/ualm_bench_text")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, f"docs{args.docs}.jsonl")
    if not os.path.exists(corpus):
        make_corpus(corpus, args.docs, args.chars)
    tok_dir = os.path.join(args.workdir, f"bpe{args.vocab_size}")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from megatron_ualm.data.tokenizer import train_tiny_tokenizer
        with open(corpus, encoding="utf-8") as f:
            sample = [next(f) for _ in range(min(args.docs, 3000))]
        texts = [json.loads(line)["output"] for line in sample]
        train_tiny_tokenizer(texts, tok_dir, vocab_size=args.vocab_size)
    chars = os.path.getsize(corpus)
    print(f"corpus: {args.docs:,} docs, {chars / args.docs:,.0f} bytes/line; tokenizer {tok_dir}")
    for workers in args.workers or [2]:
        out = os.path.join(args.workdir, f"out_w{workers}")
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "preprocess_text.py"),
                               "--input", corpus, "--tokenizer", tok_dir, "--out", out,
                               "--workers", str(workers), "--overwrite", "--no-progress"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        load = os.getloadavg()[0]
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        with open(out + ".meta.json", encoding="utf-8") as f:
            counts = json.load(f)["counts"]
        docs, toks = counts["documents"], counts["text_tokens"]
        print(f"workers={workers}: {wall:.2f} s wall (whole process) -> {docs / wall:,.0f} docs/s, "
              f"{toks / wall / 1e6:.3f}M tokens/s ({toks:,} stream-0 tokens incl. "
              f"{docs * 9:,} special); CPU {cpu:.2f} s = {docs / cpu:,.0f} docs per CPU-second; "
              f"load average {load:.1f} on {os.cpu_count()} cores (other users slow the wall figure)")
    print("anchor (ENVIRONMENT.md, 100k docs): Megatron-LM preprocess_data.py --workers 2: "
          "1,917 docs/s, 630k tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
