#!/usr/bin/env python
"""Convert a local Qwen2.5 HF directory into the initial UALM Megatron checkpoint.

    python checkpoints_convert/hf_to_megatron.py --hf Qwen2.5-1.5B/ --out runs/ualm-init \\
        [--config examples/qwen2.5-1.5b.yaml] [--num-codebooks 8 --codebook-size 1024] \\
        [--encoder qwen2_5_omni --encoder-path Qwen2.5-Omni-7B/] [--tensor-parallel 2] \\
        [--dtype bf16] [--seed 0] [--overwrite] [key=value ...]

Writes <out>/config.yaml (model shape from the HF config.json; train with
`--config <out>/config.yaml`) and <out>/checkpoints/iter_0000000 (model only; loads at any
TP/PP). Exit status 2 with one line on stderr when the input is refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, quiet_megatron  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@exit_on_user_error
def main(argv=None) -> int:
    quiet_megatron()
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="local HF Qwen2/Qwen2.5 directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output experiment directory (created)")
    p.add_argument("--config", help="base UALM YAML (non-shape settings); default: built-in defaults")
    p.add_argument("--num-codebooks", type=int, help="K, codec codebooks (model.num_codebooks)")
    p.add_argument("--codebook-size", type=int, help="C, codes per codebook (model.codebook_size)")
    p.add_argument("--encoder", choices=("qwen2_5_omni", "whisper", "none"), help="model.encoder.kind")
    p.add_argument("--encoder-path", help="local encoder directory: Qwen2.5-Omni model/thinker/audio encoder, "
                                          "or Whisper; default model.encoder.path (a random tiny encoder only with "
                                          "model.encoder.random_init=true)")
    p.add_argument("--tensor-parallel", type=int, help="pad the vocabulary for this TP size (default "
                                                       "parallel.tensor_parallel)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep the HF dtypes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new rows / stream embeddings / adapter")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.init_method_std=0.01")
    args = p.parse_args(argv)

    import torch
    from megatron_ualm.config import load_config
    from megatron_ualm.convert import convert_hf_to_megatron

    overrides = list(args.overrides)
    for flag, key in ((args.num_codebooks, "model.num_codebooks"), (args.codebook_size, "model.codebook_size"),
                      (args.encoder, "model.encoder.kind")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    cfg = load_config(args.config, overrides)
    report = convert_hf_to_megatron(
        args.hf, args.out, cfg, encoder_path=args.encoder_path, tensor_parallel=args.tensor_parallel,
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None, seed=args.seed,
        overwrite=args.overwrite, show_progress=False if args.no_progress else None)
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
