"""Answer a manifest of requests with a trained UALM: text answers, audio understanding,
text-to-audio.

    python -m megatron_ualm.generate --checkpoint CKPT --requests requests.jsonl --out OUT \\
        [key=value ...]

CKPT: a Megatron checkpoint (or experiment) directory with its config.yaml, or an exported
HF directory. Requests: JSONL (or a JSON list), one object per request -- formats in
``megatron_ualm/inference/prompts.py``, e.g.

    {"id": "q1", "prompt": "What is 2 + 2?"}
    {"id": "a1", "audio": "clips/dog.wav", "prompt": "What animal is this?"}
    {"id": "t1", "caption": "a dog barks twice", "settings": {"guidance_scale": 4}}
    {"id": "r1", "prompt": "Make a calm rain sound.", "mode": "reasoning"}

A reasoning request plans in text, generates a clip, hears it through the audio encoder,
critiques and regenerates, up to ``max_rounds`` clips; its transcript (text parts and clip
paths) is printed and stored in its answer record.

Settings (key=value): every ``GenerationSettings`` field (text_temperature, audio_top_k,
guidance_scale, max_new_rows, max_audio_seconds, seed, batch_size, max_rounds, ...) and
tokenizer=DIR, codec=DIR, device=cpu|cuda, precision=fp32|bf16, backend=graph|cached|full
(default: graph where it applies, see ``Engine``).

Output in OUT: ``answers.jsonl`` (one record per request, manifest order; format in
``megatron_ualm/inference/runner.py``), ``wavs/*.wav`` (16 kHz), ``summary.json``.
Exit status 0 when every request got a record (error records included), 1 otherwise, 2
(one line on stderr) for a mistake in the command: a missing or damaged checkpoint, requests
file, tokenizer or codec, or a bad setting -- all checked before the model is built.

Several processes (torchrun / srun): rank r answers requests r, r + W, r + 2W, ... and
rank 0 merges the per-rank files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, setup_logging
from megatron_ualm.config_loader import ConfigError
from megatron_ualm.errors import UserError

RUN_KEYS = ("tokenizer", "codec", "device", "precision", "backend", "max_prompt_rows")
RUN_CHOICES = {"device": ("cpu", "cuda"), "precision": ("fp32", "bf16"), "backend": ("graph", "cached", "full")}


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m megatron_ualm.generate", description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Megatron checkpoint/experiment dir or exported HF dir")
    parser.add_argument("--requests", required=True, help="JSONL (or JSON list) of requests")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("settings", nargs="*", help="key=value generation settings")
    args = parser.parse_args(argv)
    run, overrides = {}, {}
    for item in args.settings:
        if "=" not in item:
            parser.error(f"{item}: expected key=value")
        key, value = item.split("=", 1)
        (run if key in RUN_KEYS else overrides)[key] = value
    for key, allowed in RUN_CHOICES.items():
        if key in run and run[key] not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {run[key]!r}")
    if "max_prompt_rows" in run and not (run["max_prompt_rows"].isdigit() and int(run["max_prompt_rows"]) > 0):
        raise ConfigError(f"max_prompt_rows: expected a positive integer, got {run['max_prompt_rows']!r}")
    return args, run, overrides


@exit_on_user_error
def main(argv=None) -> int:
    setup_logging("%(asctime)s %(levelname)s %(message)s")
    args, run, overrides = parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_ualm.inference.engine import Engine
    from megatron_ualm.inference.loading import load_codec_for, load_model, load_tokenizer_for, open_checkpoint
    from megatron_ualm.inference.outputs import format_transcript
    from megatron_ualm.inference.runner import merge_rank_files, read_requests, run_requests, write_jsonl
    from megatron_ualm.inference.sampling import GenerationSettings
    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    # Everything the user named is checked before the model is built.
    GenerationSettings.from_overrides(overrides)
    records = list(enumerate(read_requests(args.requests)))
    if run.get("device") == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda, but no CUDA GPU is visible; pass device=cpu")
    source = open_checkpoint(args.checkpoint)
    device = run.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    rt = init_runtime(device=device, seed=0)
    precision = run.get("precision") or ("bf16" if rt.device.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer_for(source, run.get("tokenizer"))
    codec = load_codec_for(source, rt.device, run.get("codec"))
    settings = GenerationSettings.from_overrides({"frame_rate": codec.info.frame_rate, **overrides})
    model = load_model(source, rt.device, precision)
    engine = Engine(model, backend=run.get("backend"), tokenizer_size=len(tokenizer))
    load_s = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)

    mine = records[rt.rank::rt.world_size]
    t1 = time.perf_counter()
    answers = run_requests(engine, mine, args.out, settings, tokenizer.encode, tokenizer.decode, codec,
                           base_dir=os.path.dirname(os.path.abspath(args.requests)),
                           max_prompt_rows=int(run["max_prompt_rows"]) if "max_prompt_rows" in run else None,
                           rank=rt.rank)
    write_jsonl(os.path.join(args.out, f"answers.rank{rt.rank}.jsonl"), answers)
    if rt.world_size > 1:
        dist.barrier()
    status = 0
    if rt.rank == 0:
        merged = merge_rank_files(args.out, rt.world_size)
        summary = {"checkpoint": os.path.abspath(args.checkpoint), "requests": len(records),
                   "ok": sum(r["status"] == "ok" for r in merged),
                   "errors": sum(r["status"] == "error" for r in merged),
                   "world_size": rt.world_size, "device": str(rt.device), "precision": precision,
                   "load_s": load_s, "generate_s": time.perf_counter() - t1, "settings": settings.to_dict()}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        for record in merged:
            if "transcript" in record:
                print(format_transcript(record), flush=True)
        logging.info("answered %d requests (%d errors) -> %s", len(merged), summary["errors"],
                     os.path.join(args.out, "answers.jsonl"))
        status = 0 if len(merged) == len(records) else 1
    shutdown_runtime()
    return status


if __name__ == "__main__":
    sys.exit(main())
