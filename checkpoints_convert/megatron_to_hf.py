#!/usr/bin/env python
"""Export a UALM Megatron checkpoint (any TP/PP) to a HuggingFace directory.

    python checkpoints_convert/megatron_to_hf.py --checkpoint runs/ualm/checkpoints/iter_0010000 \\
        --out ualm-hf/ [--dtype bf16] [--max-shard-size 5GB] [--tokenizer DIR] [--codec DIR] [--overwrite]

--checkpoint may also be an experiment or checkpoints directory (its `latest` is used).
The backbone loads with transformers.AutoModelForCausalLM.from_pretrained(out) and, given a
tokenizer (--tokenizer or the checkpoint config's paths.tokenizer), AutoTokenizer with the
UALM chat template answers text chats; the UALM parts are in out/ualm_extras.safetensors +
out/ualm_config.json
(megatron_ualm.convert.load_ualm_from_hf rebuilds the whole model). Exit status 2 with one
line on stderr when the checkpoint is refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, quiet_megatron  # noqa: E402
from megatron_ualm.errors import UserError  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
UNITS = {"KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "B": 1}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if t.endswith(u)), "")
    try:
        size = float(t[:len(t) - len(unit)]) * UNITS.get(unit, 1)
    except ValueError:
        size = 0.0
    if not 1 <= size < float("inf"):
        raise UserError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(size)


@exit_on_user_error
def main(argv=None) -> int:
    quiet_megatron()
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="iter_XXXXXXX, checkpoints/ or experiment directory")
    p.add_argument("--out", required=True, help="output HF directory (created)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: the checkpoint's dtypes)")
    p.add_argument("--max-shard-size", default="5GB", help="largest backbone safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--tokenizer", help="the run's HF tokenizer directory: exported in unified ids with the chat "
                   "template, and recorded in ualm_config.json (default: paths.tokenizer)")
    p.add_argument("--codec", help="codec directory recorded in ualm_config.json (default: paths.codec)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    max_shard_bytes = parse_size(args.max_shard_size)
    import torch
    from megatron_ualm.convert import convert_megatron_to_hf

    report = convert_megatron_to_hf(
        args.checkpoint, args.out, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        max_shard_bytes=max_shard_bytes, overwrite=args.overwrite,
        tokenizer=args.tokenizer, codec=args.codec, show_progress=False if args.no_progress else None)
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
