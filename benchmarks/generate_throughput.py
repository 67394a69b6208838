#!/usr/bin/env python
"""Generation throughput of the UALM engine vs transformers ``generate`` on one device.

    python benchmarks/generate_throughput.py                 # Qwen2.5-1.5B shape, bf16, GPU
    python benchmarks/generate_throughput.py --tiny          # CPU smoke run (CI)
    python benchmarks/generate_throughput.py --batch-sizes 1 16 --text-tokens 256 --audio-seconds 10
    python benchmarks/generate_throughput.py --backend graph cached   # both decode backends, one run

Shape (default): Qwen2.5-1.5B decoder (28 layers, 1536 wide, 8960 FFN, 12 query / 2 KV
heads of 128), UALM vocabulary 256 + 151,936 + 8 x 1025 rows (padded to 128), K = 8,
random weights, no audio encoder. Prompts: ``--prompt-rows`` rows of random text, all of
one length (no left padding).

Measured, for each batch size B and each ``--backend`` (default: the engine's default;
every UALM result names the backend it used):
* ``ualm_text``: text answers, greedy, ``--text-tokens`` new tokens per request
  (``<|eos|>``/``<|eot|>`` are masked so every request runs the full length).
  tokens/s = B * tokens / (prefill + decode seconds).
* ``ualm_audio``: text-to-audio with guidance (g = 3, so 2B rows per forward), audio
  sampling defaults, ``--audio-seconds`` of audio per request (the end choices are masked so
  every segment runs to max_audio_seconds, then writes its K - 1 closing rows and END).
  Reported: rows/s, audio seconds generated per wall second, and wall seconds per 10 s of
  audio per request (the batch's wall time scaled to 10 s).
* ``hf_text``: ``Qwen2ForCausalLM.generate`` (sdpa, bf16, static KV cache off, greedy,
  ``min_new_tokens = max_new_tokens``) on the same backbone shape and vocabulary size,
  the same prompt length and new-token count, batch B; and ``hf_cfg_rows``: the same at
  batch 2B with the audio row count (the work one guided audio request needs, without the
  K-stream head).

Each measurement runs ``--warmup`` untimed calls first. Results print as JSON lines and
go to ``--out`` (JSON) when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import FULL, TINY, sync  # noqa: E402  (same shapes as the training benchmark)


def build_ualm(shape: dict, precision: str, device, max_positions: int):
    from megatron_ualm.config import EncoderConfig, ModelConfig
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    cfg = ModelConfig(**shape, max_position_embeddings=max_positions, attention_backend="sdpa",
                      encoder=EncoderConfig(kind="none"))
    model = UALMModel(cfg, transformer_config_from(cfg, None, precision))
    return model.to(device).eval()


def never_end(engine):
    """Mask the end choices so every request runs its full length (benchmark only)."""
    from megatron_ualm.formats import vocab as V
    from megatron_ualm.inference.state import MASK_AUDIO0_OR_END, MASK_AUDIO0, MASK_TEXT
    engine.stream0_masks[MASK_TEXT, [V.EOS, V.EOT]] = False
    engine.stream0_masks[MASK_AUDIO0_OR_END] = engine.stream0_masks[MASK_AUDIO0]


def prompts_for(vocab, batch: int, rows: int, modality: str, seed: int = 0):
    from megatron_ualm.formats import vocab as V
    from megatron_ualm.inference.engine import Prompt
    rng = np.random.RandomState(seed)
    out = []
    for b in range(batch):
        r = np.zeros((rows, vocab.num_codebooks), dtype=np.int64)
        r[:, 0] = vocab.text_offset + rng.randint(0, min(vocab.text_vocab_size, 30_000), size=rows)
        r[0, 0], r[1, 0], r[2, 0], r[-2, 0], r[-1, 0] = V.BOS, V.USER, V.TEXT, V.EOS, V.ASSISTANT
        out.append(Prompt(r, modality=modality, seed=seed * 1000 + b))
    return out


def timed(fn, warmup: int, device):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def bench_ualm(model, args, device, batch: int, backend=None) -> list[dict]:
    from megatron_ualm.inference.engine import Engine
    from megatron_ualm.inference.sampling import GenerationSettings
    engine = Engine(model, backend=backend)
    never_end(engine)
    K = model.vocab.num_codebooks
    results = []

    text_settings = GenerationSettings(max_new_rows=args.text_tokens + 1, batch_size=batch)
    prompts = prompts_for(model.vocab, batch, args.prompt_rows, "text")
    secs, gens = timed(lambda: engine.generate(prompts, text_settings), args.warmup, device)
    tokens = sum(len(g.segments[0].ids) for g in gens)
    results.append({"bench": "ualm_text", "backend": engine.backend, "batch": batch,
                    "new_tokens_per_request": tokens // batch,
                    "seconds": secs, "tokens_per_s": tokens / secs,
                    "prefill_s": gens[0].timing["prefill_s"], "decode_s": gens[0].timing["decode_s"]})

    frames = int(round(args.audio_seconds * 50))
    audio_settings = GenerationSettings(max_new_rows=frames + K + 2, max_audio_seconds=args.audio_seconds,
                                        batch_size=batch)
    prompts = prompts_for(model.vocab, batch, args.prompt_rows, "audio")
    secs, gens = timed(lambda: engine.generate(prompts, audio_settings), args.warmup, device)
    got = [g.segments[0].num_frames for g in gens]
    rows = sum(len(g.rows) for g in gens)
    audio_s = sum(got) / 50.0
    results.append({"bench": "ualm_audio", "backend": engine.backend, "batch": batch,
                    "frames_per_request": got[0], "guided": gens[0].timing["guided"],
                    "seconds": secs, "rows_per_s": rows / secs, "audio_s_per_s": audio_s / secs,
                    "seconds_per_10s_audio_per_request": secs * 10.0 / (audio_s / batch)})
    return results


def build_hf(shape: dict, vocab_rows: int, max_positions: int, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=vocab_rows, hidden_size=shape["hidden_size"],
                         intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_query_groups"], head_dim=shape["kv_channels"],
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         rope_theta=1e6, attn_implementation="sdpa", pad_token_id=0, eos_token_id=None)
    with torch.device(device):  # initialise on the device (1.8B parameters)
        return Qwen2ForCausalLM(config).to(dtype).eval()


def bench_hf(model, vocab_rows: int, args, device, batch: int, new_tokens: int, name: str) -> dict:
    ids = torch.randint(300, min(vocab_rows, 30_000), (batch, args.prompt_rows), device=device)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)
    secs, out = timed(run, args.warmup, device)
    made = (out.shape[1] - ids.shape[1]) * batch
    return {"bench": name, "batch": batch, "new_tokens_per_request": made // batch, "seconds": secs,
            "tokens_per_s": made / secs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--prompt-rows", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--audio-seconds", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--only", choices=("ualm", "hf"), default=None)
    p.add_argument("--backend", nargs="+", choices=("graph", "cached", "full"), default=[None],
                   help="UALM decode backend(s), each timed in turn (default: the engine's default)")
    p.add_argument("--out", default=None, help="write all results to this JSON file")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch_sizes = args.batch_sizes or ([1, 4] if tiny else [1, 16])
    args.prompt_rows = args.prompt_rows or (16 if tiny else 128)
    args.text_tokens = args.text_tokens or (16 if tiny else 256)
    args.audio_seconds = args.audio_seconds or (0.2 if tiny else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0 if tiny else 1)

    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu" if tiny else None, seed=0)
    device = rt.device
    precision = "fp32" if device.type == "cpu" else "bf16"
    shape = TINY if tiny else FULL
    frames = int(round(args.audio_seconds * 50))
    max_positions = args.prompt_rows + max(args.text_tokens, frames + shape["num_codebooks"]) + 8
    results = []
    vocab_rows = None
    if args.only in (None, "ualm"):
        model = build_ualm(shape, precision, device, max_positions)
        vocab_rows = model.vocab.padded_size
        for b in args.batch_sizes:
            for backend in args.backend:
                for r in bench_ualm(model, args, device, b, backend):
                    print(json.dumps(r), flush=True)
                    results.append(r)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.only in (None, "hf"):
        from megatron_ualm.model.ualm_model import padded_vocab
        from megatron_ualm.config import ModelConfig
        vocab_rows = vocab_rows or padded_vocab(ModelConfig(**shape), 1).padded_size
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        hf = build_hf(shape, vocab_rows, max_positions, device, dtype)
        for b in args.batch_sizes:
            for name, bb, n in (("hf_text", b, args.text_tokens),
                                ("hf_cfg_rows", 2 * b, frames + shape["num_codebooks"] + 1)):
                r = bench_hf(hf, vocab_rows, args, device, bb, n, name)
                print(json.dumps(r), flush=True)
                results.append(r)
        del hf
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "shape": shape, "args": vars(args), "results": results}, f, indent=2)
    shutdown_runtime()


if __name__ == "__main__":
    main()
